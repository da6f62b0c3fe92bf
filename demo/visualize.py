"""See what an MAE learned: reconstruction figures from a pre-training checkpoint, like the paper's Figure 2.

    python demo/visualize.py --checkpoint demo_output/checkpoint-last.pth demo/data/val --out demo_output/figures
    python demo/visualize.py --checkpoint mae_visualize_vit_large.pth --model mae_vit_large_patch16 cat.jpg
    python demo/visualize.py demo/data/val/color --checkpoint demo_output/checkpoint-last.pth --grid \\
        --mask_ratios 0.5 0.75 0.9 --out demo_output/reconstructions.png

(``--mask_ratios`` takes several values: put the images before it.)

One PNG per image with four panels: the original, the masked input (removed patches grey), the reconstruction, and
the reconstruction with the visible patches pasted back. ``--grid`` puts several images (rows) and mask ratios
(columns) in one PNG instead.

The checkpoint must hold the whole MAE, decoder included: main_pretrain.py's ``checkpoint-*.pth``, or the
reference's released ``mae_visualize_vit_*.pth`` / ``mae_pretrain_vit_*_full.pth``. Encoder-only files (the released
``mae_pretrain_vit_*.pth``) and fine-tuned classifiers cannot reconstruct anything. The model, image size and
target come from the checkpoint's ``args`` (ours); released files have none: the model is then recognised from the
weights' shapes, and the target is taken to be normalised pixels for ``mae_pretrain_vit_*_full.pth`` (so its
authors say) and plain pixels otherwise (``mae_visualize_vit_*.pth``); ``--norm_pix_loss`` /
``--no_norm_pix_loss`` override.

Models trained with ``--norm_pix_loss`` predict each patch normalised by its own mean and standard deviation; to be
shown as pixels the prediction needs that mean and std back. By default they are the true patch's (so the colour and
contrast of each masked patch come from the original; the model contributes the structure within it), and the figure
says so. ``--denorm neighbours`` estimates them from the visible patches around each masked patch instead, using no
pixel of the masked patch.
"""
import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models_mae  # noqa: E402
import util.training.process as process  # noqa: E402
from util.data import data_stats  # noqa: E402
from util.checkpoints import from_checkpoint  # noqa: E402
from util.datasets import ToTensor  # noqa: E402
from util.errors import UsageError  # noqa: E402
from util.flag_checks import check_device  # noqa: E402
from util.flags import SEED_MAX, Parser, Range, add_normalisation_args  # noqa: E402
from util.data.image_decode import BAD_FILE_ERRORS, bad_file_reason, read_image  # noqa: E402
from util.data.image_sources import check_outputs_outside_data, image_paths  # noqa: E402
from util.training.output_dir import check_outputs  # noqa: E402

# the default normalisation (util/data/data_stats.py holds it); a checkpoint's own --mean/--std replace it
IMAGENET_MEAN, IMAGENET_STD = data_stats.DEFAULT_MEAN, data_stats.DEFAULT_STD
NORM_PIX_EPS = 1e-6  # the loss's: target = (patch - mean) / sqrt(var + eps)
DENORM_MODES = ('true_patch', 'neighbours')

# figure layout, in output pixels: a caption band of CAPTION_LINES text lines (more only if the text does not fit the
# width), a band of column labels, then rows of tiles; PAD around and between everything
PAD = 4
LINE_H = 14
LABEL_H = 14
CAPTION_LINES = 2
GREY = 0.5  # colour of removed patches in the masked-input panel
BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)


def get_args_parser():
    parser = Parser(
        'MAE reconstruction figures', description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False)  # (run_main adds -h/--help)
    parser.add_argument('images', nargs='+',
                        help='image files, folders (searched recursively, in sorted order), .txt lists of image '
                             'paths (one per line), or tar shards / a Hugging Face dataset')
    parser.add_argument('--checkpoint', required=True,
                        help='a full MAE checkpoint with the decoder: main_pretrain.py checkpoint-*.pth, or the '
                             "reference's mae_visualize_vit_*.pth / mae_pretrain_vit_*_full.pth")
    parser.add_argument('--model', default=None,
                        help='MAE architecture (default: from the checkpoint, else inferred from its weight shapes): '
                             + ', '.join(models_mae.MODELS))
    parser.add_argument('--input_size', default=None, type=Range(int, 1),
                        help="image size the model sees (default: the checkpoint's, else the one its position "
                             "embedding was made for, else 224)")
    parser.add_argument('--mask_ratio', default=0.75, type=Range(float, 0, 1, high_open=True),
                        help='fraction of patches removed')
    parser.add_argument('--seed', default=0, type=Range(int, 0, SEED_MAX),
                        help='seed of the masks: the same seed and image list give the same masks (the k-th image '
                             'gets the k-th draw); the global random state is not used')
    parser.add_argument('--norm_pix_loss', action='store_true', default=None,
                        help="the model predicts per-patch normalised pixels (default: from the checkpoint's args; "
                             "without args: on for the released mae_pretrain_vit_*_full.pth, else off)")
    parser.add_argument('--no_norm_pix_loss', action='store_false', dest='norm_pix_loss',
                        help='the model predicts plain pixels (overrides the checkpoint\'s args)')
    parser.add_argument('--denorm', default='true_patch', choices=DENORM_MODES,
                        help='norm-pix models only: where the mean/std that turn a predicted patch into pixels come '
                             'from: the true patch (default) or the visible patches around it (an estimate)')
    parser.add_argument('--grid', action='store_true',
                        help='one PNG: a row per image, for each of --mask_ratios the masked input and the '
                             'reconstruction with visible patches')
    parser.add_argument('--mask_ratios', default=None, type=Range(float, 0, 1, high_open=True), nargs='+',
                        help='mask ratios of the --grid columns (default: --mask_ratio); put the images before '
                             'this flag')
    parser.add_argument('--scale', default=0, type=Range(int, 1, special=(0,), meaning='0 (automatic)'),
                        help='integer upscaling of the tiles, nearest neighbour (default: 128 // input_size, at '
                             'least 1)')
    parser.add_argument('--colors', default=0, type=Range(int, 2, 256, special=(0,), meaning='0 (full colour)'),
                        help='store the PNG with a palette of this many colours (2-256; much smaller files, e.g. for '
                             'a README); default 0: full colour, exact pixels')
    parser.add_argument('--out', default='reconstructions',
                        help='output folder (one <image>.png each), or a .png file name (with --grid, or for one '
                             'image); default: ./reconstructions')
    parser.add_argument('--device', default='cpu', help='cpu, cuda, cuda:1, ...')
    add_normalisation_args(parser, checkpoint_flag='--checkpoint', measure=False)
    return parser


# ---------------------------------------------------------------------------------------------------- inputs
def load_image(path, input_size, mean=IMAGENET_MEAN, std=IMAGENET_STD, in_chans=3, to_grayscale=False):
    """``path`` as the model's input: read as in training (``read_image``: RGB for 3 channels; ``to_grayscale``:
    colour converted for one channel), short side resized
    to ``input_size`` (bicubic), centre crop, normalised with ``mean`` and ``std`` as in training; a (in_chans,
    input_size, input_size) tensor."""
    import torchvision.transforms as transforms
    try:
        img = read_image(path, in_chans, to_grayscale)
    except BAD_FILE_ERRORS as e:
        raise UsageError(f"bad image file {path} ({bad_file_reason(path, e)})") from None
    transform = transforms.Compose([
        transforms.Resize(input_size, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
        transforms.CenterCrop(input_size),
        ToTensor(),
        transforms.Normalize(mean=mean, std=std)])
    return transform(img)


# ---------------------------------------------------------------------------------------------------- model
def load_mae(args):
    """Build the MAE of ``args.checkpoint`` and load its weights (``util.checkpoints.from_checkpoint.load_mae``:
    the model is recognised from the weights' shapes when the file does not say); resolves ``args.model``,
    ``args.input_size``, ``args.norm_pix_loss`` and the channels and normalisation (``args.in_chans``, ``args.mean``,
    ``args.std``) from the flags, the checkpoint's args and its shapes. Returns the model, in eval mode."""
    model, info = from_checkpoint.load_mae(args.checkpoint, model=args.model, input_size=args.input_size,
                                           norm_pix_loss=args.norm_pix_loss)
    args.model, args.input_size, args.norm_pix_loss = info['mae_model'], info['input_size'], info['norm_pix_loss']

    # the channels and normalisation the model was trained with, unless given (said in one line)
    trained = data_stats.stats_from_checkpoint(info['args'], model.state_dict())
    if args.in_chans is None:
        args.in_chans = trained['in_chans']
    elif args.in_chans != trained['in_chans']:
        raise UsageError(f"--in_chans {args.in_chans}: --checkpoint {args.checkpoint} is a {trained['in_chans']}-"
                         f"channel model (leave --in_chans out)")
    if args.mean is None:
        args.mean, args.std = trained['mean'], trained['std']
        if trained['stored']:
            print(f"Normalisation: mean {data_stats.fmt(args.mean)} std {data_stats.fmt(args.std)} from --checkpoint "
                  f"{args.checkpoint} (pass --mean/--std to override)")
    data_stats.check_values(args.mean, args.std, args.in_chans, where=f" (for {args.in_chans} channels)")
    return model


# ---------------------------------------------------------------------------------------------------- reconstruction
def draw_noise(generator, num_patches):
    """The masking noise of one image (the mask keeps the patches with the smallest noise)."""
    return torch.rand(1, num_patches, generator=generator)


def predict(model, img, mask_ratio, noise):
    """Run the MAE on one normalised image (C, H, W) with the mask given by ``noise`` (1, L). Returns the prediction
    (L, p*p*C) and the mask (L,), 1 = removed, both on the CPU."""
    device = next(model.parameters()).device
    with torch.no_grad():
        _, pred, mask = model(img[None].to(device), mask_ratio=mask_ratio, noise=noise.to(device))
    return pred[0].float().cpu(), mask[0].float().cpu()


def patch_stats(model, img):
    """Each patch's mean and std as the norm-pix loss normalises it: over the patch's p*p*C normalised values,
    unbiased variance, eps 1e-6. Shapes (L, 1)."""
    target = model.patchify(img[None].cpu())[0]
    mean = target.mean(dim=-1, keepdim=True)
    std = (target.var(dim=-1, keepdim=True) + NORM_PIX_EPS) ** .5
    return mean, std


def neighbour_stats(mean, std, mask, grid):
    """For each removed patch, the mean and std averaged over the visible patches nearest to it (the smallest square
    ring around it that holds one); visible patches keep their own. With nothing visible: mean 0, std 1."""
    h, w = grid
    m, s = mean.view(h, w).clone(), std.view(h, w).clone()
    visible = (mask.view(h, w) == 0)
    true_m, true_s = mean.view(h, w), std.view(h, w)
    for i, j in torch.nonzero(~visible).tolist():
        for r in range(1, max(h, w)):
            win = (slice(max(i - r, 0), i + r + 1), slice(max(j - r, 0), j + r + 1))
            vis = visible[win]
            if vis.any():
                m[i, j] = true_m[win][vis].mean()
                s[i, j] = true_s[win][vis].mean()
                break
        else:
            m[i, j], s[i, j] = 0., 1.
    return m.view(-1, 1), s.view(-1, 1)


def to_display(x, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Un-normalise (``mean``/``std``, ImageNet's by default) a (C, H, W) tensor into an (H, W, 3) array in [0, 1]:
    RGB for 3 channels, grey for 1; of more channels the first three are shown as RGB, of two the first as grey."""
    c = x.shape[0]
    x = torch.clip(x * torch.as_tensor(std).view(c, 1, 1) + torch.as_tensor(mean).view(c, 1, 1), 0, 1)
    x = x[:3] if c >= 3 else x[:1].repeat(3, 1, 1)
    return x.permute(1, 2, 0).numpy()


def make_panels(model, img, pred, mask, norm_pix=False, denorm='true_patch', mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """The four panels of one figure, as (H, W, 3) float arrays in [0, 1]: 'original', 'masked' (removed patches
    grey), 'reconstruction' (the model's output everywhere), 'pasted' (the reconstruction in the removed patches, the
    original elsewhere: exactly the original's pixels there). Also 'mask' as a (grid_h, grid_w) bool array.

    ``pred`` is in the model's target units: normalised pixels, or, with ``norm_pix``, each patch normalised by its
    own mean/std, which are then taken from the true patch (``denorm='true_patch'``) or estimated from the visible
    patches around it (``'neighbours'``). ``mean``/``std``: the normalisation of the inputs, undone for display."""
    if denorm not in DENORM_MODES:
        raise ValueError(f"denorm must be one of {DENORM_MODES}, got {denorm!r}")
    img = img.cpu()
    if norm_pix:
        patch_mean, patch_std = patch_stats(model, img)
        if denorm == 'neighbours':
            patch_mean, patch_std = neighbour_stats(patch_mean, patch_std, mask, model.patch_embed.grid_size)
        pred = pred * patch_std + patch_mean
    recon = model.unpatchify(pred[None])[0]
    p = model.patch_size
    c = model.in_chans
    pixel_mask = model.unpatchify(mask.view(1, -1, 1).repeat(1, 1, p * p * c))[0, :1].repeat(3, 1, 1).permute(
        1, 2, 0).numpy() > 0.5

    original = to_display(img, mean, std)
    reconstruction = to_display(recon, mean, std)
    return {
        'original': original,
        'masked': np.where(pixel_mask, np.float32(GREY), original),
        'reconstruction': reconstruction,
        'pasted': np.where(pixel_mask, reconstruction, original),
        'mask': mask.view(*model.patch_embed.grid_size).numpy() > 0.5,
    }


def reconstruct(model, img, mask_ratio=0.75, seed=0, norm_pix=False, denorm='true_patch', noise=None,
                mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """The panels (see ``make_panels``) of one normalised image (C, H, W), masking ``mask_ratio`` of the patches
    with the mask drawn from ``seed`` (or given as ``noise``, (1, L))."""
    if noise is None:
        noise = draw_noise(torch.Generator().manual_seed(seed), model.patch_embed.num_patches)
    pred, mask = predict(model, img, mask_ratio, noise)
    return make_panels(model, img, pred, mask, norm_pix=norm_pix, denorm=denorm, mean=mean, std=std)


# ---------------------------------------------------------------------------------------------------- figures
def denorm_note(norm_pix, denorm):
    if not norm_pix:
        return 'pixel-target model: reconstruction as predicted'
    if denorm == 'true_patch':
        return "norm-pix model: each patch de-normalised with the true patch's mean/std"
    return 'norm-pix model: mean/std of each removed patch estimated from visible neighbours'


def _font():
    return ImageFont.load_default()


def _wrap(text, font, width):
    """``text`` cut into lines no wider than ``width`` pixels (at word boundaries)."""
    lines, line = [], ''
    for word in text.split(' '):
        trial = f"{line} {word}" if line else word
        if line and font.getlength(trial) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + [line]


def _fit(text, font, width):
    """``text`` shortened with an ellipsis until it is at most ``width`` pixels wide."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + '…') > width:
        text = text[:-1]
    return text + '…'


def to_uint8(panel, scale):
    a = np.rint(np.clip(panel, 0, 1) * 255).astype(np.uint8)
    return a.repeat(scale, axis=0).repeat(scale, axis=1) if scale > 1 else a


def figure_size(rows, cols, tile, caption_lines=CAPTION_LINES):
    """Width and height in pixels of a figure of ``rows`` x ``cols`` square tiles of ``tile`` pixels."""
    return (cols * tile + (cols + 1) * PAD,
            PAD + caption_lines * LINE_H + LABEL_H + rows * (tile + PAD))


def render(rows, labels, caption, scale):
    """A figure: ``caption`` (a list of paragraphs) on top, ``labels`` over the columns, then ``rows`` of panels
    ((H, W, 3) arrays in [0, 1]). Returns a PIL RGB image."""
    font = _font()
    tile = rows[0][0].shape[0] * scale
    cols = len(labels)
    width = figure_size(len(rows), cols, tile)[0]
    lines = [line for paragraph in caption for line in _wrap(paragraph, font, width - 2 * PAD)]
    lines += [''] * (CAPTION_LINES - len(lines))
    width, height = figure_size(len(rows), cols, tile, len(lines))
    fig = Image.new('RGB', (width, height), BACKGROUND)
    draw = ImageDraw.Draw(fig)
    for k, line in enumerate(lines):
        draw.text((PAD, PAD + k * LINE_H), line, fill=TEXT, font=font)
    top = PAD + len(lines) * LINE_H
    for c, label in enumerate(labels):
        label = _fit(label, font, tile)
        x = PAD + c * (tile + PAD) + (tile - font.getlength(label)) / 2
        draw.text((x, top), label, fill=TEXT, font=font)
    top += LABEL_H
    for r, row in enumerate(rows):
        for c, panel in enumerate(row):
            fig.paste(Image.fromarray(to_uint8(panel, scale)), (PAD + c * (tile + PAD), top + r * (tile + PAD)))
    return fig


def save_png(fig, path, colors=0):
    if colors:
        fig = fig.quantize(colors, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.save(path, optimize=True)


# ---------------------------------------------------------------------------------------------------- main
def check_args(args):
    data_stats.check_args(args)  # --in_chans, --mean, --std
    if args.mask_ratios and not args.grid:
        raise UsageError("--mask_ratios needs --grid (one figure per image uses --mask_ratio)")
    check_device(args)  # a device torch knows, a GPU index there is
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: no CUDA device available (use --device cpu)")
    return device


def output_paths(args, images):
    """Where each figure goes: ``--out`` itself when it names a .png file, else ``--out/<name>.png``."""
    single_file = args.out.lower().endswith('.png')
    if args.grid:
        return [args.out if single_file else os.path.join(args.out, 'reconstructions.png')]
    if single_file:
        if len(images) != 1:
            raise UsageError(f"--out {args.out} is one file but there are {len(images)} images: give a folder")
        return [args.out]
    paths, seen = [], set()
    for _, name in images:
        base = os.path.join(args.out, os.path.splitext(name)[0])
        path, k = base + '.png', 2
        while path in seen:  # two images of the same name from different places
            path, k = f"{base}-{k}.png", k + 1
        seen.add(path)
        paths.append(path)
    return paths


def main(args):
    device = check_args(args)
    found = image_paths(args.images)  # (the figure's name of each: its path below its folder or list)
    images = list(zip(found.paths, found.names))
    outputs = output_paths(args, images)
    # no figure may replace an input (``--out`` the folder of the images, or an image itself)
    check_outputs(outputs, '--out', [('--checkpoint', args.checkpoint)] + [('the image', p) for p, _ in images])
    # (figures written among the images of a folder given would be read as images the next time)
    check_outputs_outside_data([('--out', args.out)], [('visualize.py', p) for p in args.images if os.path.isdir(p)])
    model = load_mae(args).to(device)
    num_patches = model.patch_embed.num_patches
    for ratio in args.mask_ratios or [args.mask_ratio]:
        if int(num_patches * (1 - ratio)) == 0:  # (the model's random_masking keeps as many)
            raise UsageError(f"--mask_ratio{'s' if args.mask_ratios else ''} {ratio:g} keeps no patch of the "
                             f"{num_patches} of {args.model} at --input_size {args.input_size}: the figure would "
                             f"be all grey (at most {(num_patches - 1) / num_patches:.4g} keeps one)")
    # every file is checked before any output
    tensors = [load_image(path, args.input_size, args.mean, args.std, args.in_chans, args.to_grayscale)
               for path, _ in images]
    scale = args.scale or max(1, 128 // args.input_size)
    for folder in sorted({os.path.dirname(path) or '.' for path in outputs}):
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"--out {folder} cannot be created ({e.strerror or e})") from None

    generator = torch.Generator().manual_seed(args.seed)
    note = denorm_note(args.norm_pix_loss, args.denorm)
    title = f"{args.model} ({os.path.basename(args.checkpoint)}), {args.input_size}px, seed {args.seed}"

    def panels(img, ratio, noise):
        return reconstruct(model, img, ratio, norm_pix=args.norm_pix_loss, denorm=args.denorm, noise=noise,
                           mean=args.mean, std=args.std)

    if args.grid:
        ratios = args.mask_ratios or [args.mask_ratio]
        rows = []
        for img in tensors:
            noise = draw_noise(generator, num_patches)  # one mask draw per image: the ratios' masks are nested
            row = []
            for r in ratios:
                p = panels(img, r, noise)
                row += [p['masked'], p['pasted']]
            rows.append([p['original']] + row)
        labels = ['original'] + [f"{lab} {r:.0%}" for r in ratios for lab in ('masked', 'recon.')]
        fig = render(rows, labels, [title + '; recon. = reconstruction + visible patches', note], scale)
        save_png(fig, outputs[0], args.colors)
        print(f"wrote {outputs[0]} ({len(tensors)} images x mask ratios {', '.join(map(str, ratios))}; {note})")
        return

    for (_, name), img, out in zip(images, tensors, outputs):
        p = panels(img, args.mask_ratio, draw_noise(generator, num_patches))
        labels = ['original', f"masked {args.mask_ratio:.0%}", 'reconstruction', 'recon. + visible']
        fig = render([[p['original'], p['masked'], p['reconstruction'], p['pasted']]], labels,
                     [f"{name}: {title}", note], scale)
        save_png(fig, out, args.colors)
        print(f"wrote {out} ({note})")


if __name__ == '__main__':
    process.run_main(main, get_args_parser())
