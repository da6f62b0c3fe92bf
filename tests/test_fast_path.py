"""The fast path (--no_host_sync, --fused_adamw, --grad_checkpointing, --compile, --fast) and the fast input paths
(--data_loader fast_cpu / gpu), checked on the CPU against the reference's path."""
import math
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms

import engine_pretrain
import main_finetune
import main_linprobe
import main_pretrain
import models_mae
import models_vit
import util.errors as errors
import util.training.process as process
import util.misc as misc
import util.checkpoints.resume as resume
from conftest import (TINY, one_line_error, parsed_args, pretrain_argv, read_log, run_in_process, run_script,
                      save_pretrained)
from util import compat
from util.data import fast_data
import util.crop
import util.datasets as datasets
from util.checkpoints.saver import CheckpointSaver
from util.datasets import linprobe_transform, pretrain_transform
from util.data.loaders import check_data_loader, train_loader
from util.training.run import LogWriter, NonFiniteLosses

# features of newer versions than the oldest supported (constraints-oldest.txt): there the fast path falls back
CPU_FUSED_ADAMW = misc.fused_adamw('cpu') is True  # torch >= 2.4
# --data_loader gpu's decode_jpeg of a list
BATCHED_DECODE = compat.torchvision_version() >= compat.BATCHED_JPEG_DECODE


# ---------------------------------------------------------------------------------------------------- the engine
class Writer:
    """Stands in for TensorBoard's SummaryWriter: keeps the points."""

    log_dir = 'memory'

    def __init__(self):
        self.points = []

    def add_scalar(self, tag, value, step):
        self.points.append((tag, value, step))


class Saver(CheckpointSaver):
    """The engines' checkpoint saver without a folder (nothing is written), recording the optimizer steps after
    which the loop checked for a checkpoint or a stop request."""

    def __init__(self, args):
        super().__init__(args, 'main_pretrain.py', None, None, None)
        self.told = []

    def save_or_stop(self, epoch, next_iter, metric_logger):
        self.told.append(next_iter)


class PlainRun:
    """What an epoch of the engine is given and tells (a fresh epoch over a list of batches, no checkpoints,
    stopping past ``limit`` non-finite losses): TensorBoard points kept, checkpoint checks and non-finite reports
    recorded."""

    def __init__(self, limit=10):
        self.limit, self.log_writer, self.skipped, self.saver = limit, Writer(), [], None

    @property
    def told(self):
        return self.saver.told


def pretrain_args(**kw):
    base = dict(accum_iter=1, lr=1e-3, min_lr=0., warmup_epochs=1, epochs=2, device='cpu', amp='none')
    flags = [f'--{k}' if v is True else [f'--{k}', str(v)] for k, v in {**base, **kw}.items() if v is not False]
    return main_pretrain.get_args_parser().parse_args(
        [f for flag in flags for f in ([flag] if isinstance(flag, str) else flag)] + ['--output_dir', ''])


def batches(n, nan_at=(), size=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = [(torch.randn(2, 3, size, size, generator=g), torch.zeros(2)) for _ in range(n)]
    for k in nan_at:
        out[k][0][0, 0, 0, 0] = math.nan
    return out


def pretrain_epoch(args, data, run=None, model=None):
    torch.manual_seed(0)
    model = model or models_mae.mae_vit_tiny_patch4()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr,
                                  fused=misc.fused_adamw(args.device) if args.fused_adamw else None)
    run = run or PlainRun()
    args.skip_nonfinite, run.saver = run.limit, Saver(args)
    judge = NonFiniteLosses.judge

    def recording(self, loss_value, step):  # the non-finite losses the policy was told of
        if not math.isfinite(loss_value):
            run.skipped.append((loss_value, self.epoch, step))
        return judge(self, loss_value, step)
    with mock.patch.object(NonFiniteLosses, 'judge', recording):  # (LogWriter: the entry points' writer around it)
        stats = engine_pretrain.train_one_epoch(model, data, optimizer, torch.device('cpu'), 0,
                                                misc.NativeScalerWithGradNormCount(args),
                                                log_writer=LogWriter(run.log_writer, args.no_host_sync), args=args,
                                                saver=run.saver)
    return stats, run, model, optimizer


@pytest.mark.parametrize('accum_iter', [1, 3])
def test_device_reads_give_the_reference_meters_points_and_weights(accum_iter):
    """fp32 on the CPU: --no_host_sync reads the same losses later, so the epoch's averages, the TensorBoard points
    and the weights are exactly the reference path's."""
    data = batches(22)
    ref_stats, ref_run, ref_model, _ = pretrain_epoch(pretrain_args(accum_iter=accum_iter), data)
    stats, run, model, _ = pretrain_epoch(pretrain_args(accum_iter=accum_iter, no_host_sync=True), data)
    assert stats == ref_stats and 0.5 < stats['loss'] < 3
    assert run.log_writer.points == ref_run.log_writer.points
    assert len(ref_run.log_writer.points) == 2 * (22 // accum_iter)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)
    assert ref_run.told == list(range(accum_iter, 22 + 1, accum_iter))  # the reference: after every optimizer step
    # the device path: after the optimizer step that follows each read (steps 0 and 20), and at the epoch's last
    expected = {1: [1, 21, 22], 3: [3, 21]}[accum_iter]
    assert run.told == expected


def test_device_reads_happen_where_the_console_prints(monkeypatch):
    reads, syncs = [], []
    read, read_later = misc.MetricLogger.read, misc.read_later

    def counting(self):
        reads.append(len(self._rows))
        read(self)

    def syncing():
        syncs.append(len(misc._UNREAD))
        read_later()
    monkeypatch.setattr(misc.MetricLogger, 'read', counting)
    monkeypatch.setattr(misc, 'read_later', syncing)
    pretrain_epoch(pretrain_args(no_host_sync=True), batches(22))
    assert [n for n in reads if n] == [1, 20, 1]  # steps 0, 1-20, 21: three host syncs in 22 steps
    assert [n for n in syncs if n] == [2, 40, 2]  # (each step's loss on this process and its mean over processes)


@pytest.mark.parametrize('fused', [True, False])  # (True on torch < 2.4: the default AdamW, misc.fused_adamw)
def test_nan_loss_is_skipped_on_the_device_and_reported(fused):
    """A NaN loss on the fast path: its step changes neither the weights nor AdamW's state (fused AdamW: in the
    kernel; the default AdamW: one host decision), and the report comes at the next read."""
    args = pretrain_args(no_host_sync=True, fused_adamw=fused, warmup_epochs=0, min_lr=1e-3)
    data = batches(3, nan_at=[2])
    _, run, model, optimizer = pretrain_epoch(args, data)
    _, _, good_model, good_optimizer = pretrain_epoch(args, data[:2])  # the same run without the NaN step
    assert [(math.isnan(v), e, s) for v, e, s in run.skipped] == [(True, 0, 2)]
    for p, q in zip(model.parameters(), good_model.parameters()):
        assert torch.equal(p, q)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    steps = [float(s['step']) for s in optimizer.state.values()]
    assert steps == [float(s['step']) for s in good_optimizer.state.values()] and set(steps) == {2.0}
    assert optimizer.param_groups[0]['fused'] is (True if fused and CPU_FUSED_ADAMW else None)


def test_a_skipped_step_leaves_the_same_meters_and_points_on_both_paths():
    """A NaN loss at step 2 of 5, skipped: read at once (the reference's path) or at the console's prints
    (--no_host_sync), the step leaves no loss, no lr in the meters and no TensorBoard point of either."""
    data = batches(5, nan_at=[2])
    ref_stats, ref_run, _, _ = pretrain_epoch(pretrain_args(warmup_epochs=0, min_lr=1e-3), data)
    stats, run, _, _ = pretrain_epoch(pretrain_args(warmup_epochs=0, min_lr=1e-3, no_host_sync=True), data)
    assert [s for _, _, s in run.skipped] == [s for _, _, s in ref_run.skipped] == [2]
    assert stats == ref_stats and math.isfinite(stats['loss'])
    assert run.log_writer.points == ref_run.log_writer.points
    assert sorted({step for _, _, step in ref_run.log_writer.points}) == [0, 200, 600, 800]  # (step 2: 400)


def test_nan_loss_reported_late_stops_past_the_limit():
    """--skip_nonfinite 0 on the fast path: the run stops at the next read (the step itself was already skipped)."""
    args = pretrain_args(no_host_sync=True, fused_adamw=True)
    run = PlainRun(limit=0)
    with pytest.raises(errors.TrainingStopped, match='Loss is nan'):
        pretrain_epoch(args, batches(22, nan_at=[3]), run=run)
    assert [s for _, _, s in run.skipped] == [3] and run.told == [1]  # seen at the read of step 20


def test_reference_path_skips_at_once():
    run = PlainRun()
    stats, _, _, _ = pretrain_epoch(pretrain_args(), batches(4, nan_at=[1]), run=run)
    assert [s for _, _, s in run.skipped] == [1] and run.told == [1, 3, 4] and math.isfinite(stats['loss'])


def test_step_if_finite_fused_and_fallback():
    for fused in (True, False) if CPU_FUSED_ADAMW else (False,):
        p = torch.nn.Parameter(torch.ones(3))
        opt = torch.optim.AdamW([p], lr=0.1, fused=fused or None)
        p.grad = torch.full((3,), math.nan)
        misc.step_if_finite(opt, torch.tensor(math.nan))
        assert torch.equal(p.detach(), torch.ones(3)) and float(opt.state.get(p, {}).get('step', 0)) == 0
        p.grad = torch.ones(3)
        misc.step_if_finite(opt, torch.tensor(1.0))
        assert float(opt.state[p]['step']) == 1 and p.detach()[0] < 1
        assert not hasattr(opt, 'found_inf')


# ---------------------------------------------------------------------------------------------------- the flags
def test_fast_turns_on_its_flags():
    args = main_pretrain.get_args_parser().parse_args(['--fast'])
    assert (args.amp, args.fused_adamw, args.compile, args.no_host_sync) == ('bf16', True, True, True)
    assert not args.grad_checkpointing and args.data_loader == 'pil'
    default = main_pretrain.get_args_parser().parse_args([])
    assert (default.amp, default.fused_adamw, default.compile, default.no_host_sync, default.grad_checkpointing,
            default.data_loader) == ('fp16', False, False, False, False, 'pil')
    probe = main_linprobe.get_args_parser().parse_args(['--fast'])
    assert (probe.amp, probe.compile, probe.no_host_sync) == ('bf16', True, True)
    assert not hasattr(probe, 'fused_adamw') and not hasattr(probe, 'grad_checkpointing')
    ft = main_finetune.get_args_parser().parse_args(['--fast'])
    assert ft.fused_adamw and not hasattr(ft, 'data_loader')
    # a flag after --fast overrides it; one before it is overridden
    assert main_pretrain.get_args_parser().parse_args(['--fast', '--amp', 'fp16']).amp == 'fp16'
    assert main_pretrain.get_args_parser().parse_args(['--amp', 'fp16', '--fast']).amp == 'bf16'


def test_new_flags_are_marked_new_in_help():
    for module in (main_pretrain, main_finetune, main_linprobe):
        parser = module.get_args_parser()
        for action in parser._actions:
            if action.dest in ('fast', 'fused_adamw', 'compile', 'no_host_sync', 'grad_checkpointing', 'data_loader'):
                assert action.help.startswith('[new]'), action.dest


def test_fused_adamw_where_available_and_kept_on_resume(capsys):
    if not CPU_FUSED_ADAMW:  # torch < 2.4: the default AdamW, with a note
        assert misc.fused_adamw('cpu') is None
        assert capsys.readouterr().out.startswith(f"Note: --fused_adamw: torch {torch.__version__} has no fused "
                                                  f"AdamW for --device cpu (")
        return
    model = models_mae.mae_vit_tiny_patch4()
    plain = torch.optim.AdamW(model.parameters(), lr=1e-3)  # the entry points without --fused_adamw
    fused = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=misc.fused_adamw('cpu'))
    assert plain.param_groups[0]['fused'] is None and fused.param_groups[0]['fused'] is True
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    plain.step()
    resume.load_optimizer_state(fused, plain.state_dict(), 'test')  # a faithful run resumed with --fused_adamw
    assert fused.param_groups[0]['fused'] is True
    fused.step()
    assert float(next(iter(fused.state.values()))['step']) == 2


def test_compile_wraps_the_model_and_keeps_the_state_dict_keys():
    model = models_mae.mae_vit_tiny_patch4()
    compiled = torch.compile(model)  # what --compile does (compiles lazily: nothing runs here)
    assert compiled is not model and compiled._orig_mod is model
    assert list(model.state_dict()) == list(models_mae.mae_vit_tiny_patch4().state_dict())


# ---------------------------------------------------------------------------------------------------- checkpointing
def test_grad_checkpointing_gives_identical_losses_and_gradients():
    def loss_and_grads(model_fn, checkpointing, call):
        torch.manual_seed(0)
        model = model_fn()
        model.set_grad_checkpointing(checkpointing)
        torch.manual_seed(1)
        loss = call(model)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    x = torch.randn(4, 3, 32, 32)
    mae = lambda m: m(x, mask_ratio=0.75)[0]  # noqa: E731 (draws its masks after the seed)
    vit = lambda m: m(x).logsumexp(-1).mean()  # noqa: E731 (drop-path draws, replayed by the recomputation)
    for model_fn, call in ((models_mae.mae_vit_tiny_patch4, mae),
                           (lambda: models_vit.vit_tiny_patch4(num_classes=5, drop_path_rate=0.5), vit)):
        ref_loss, ref_grads = loss_and_grads(model_fn, False, call)
        loss, grads = loss_and_grads(model_fn, True, call)
        assert torch.equal(loss, ref_loss) and len(grads) == len(ref_grads) > 10
        assert all(torch.equal(g, r) for g, r in zip(grads, ref_grads))


def run_ok(module, *argv):
    """An entry point's main() through run_main, as the script runs it (a failure raises SystemExit)."""
    process.run_main(module.main, module.get_args_parser(), [str(a) for a in argv])


def test_finetune_fast_flags_give_the_reference_log_in_fp32(tmp_path):
    """Fine-tuning on the CPU in fp32 with drop-path, Mixup/CutMix and layer decay: --no_host_sync and
    --grad_checkpointing give the reference path's log.txt, value for value."""
    pretrained = save_pretrained(tmp_path / 'pre.pth')
    rows = []
    for name, extra in (('ref', []), ('fast', ['--no_host_sync', '--grad_checkpointing'])):
        run_ok(main_finetune, '--model', 'vit_tiny_patch4', '--input_size', '32', '--batch_size', '4', '--epochs',
               '2', '--warmup_epochs', '1', '--data_path', TINY, '--device', 'cpu', '--num_workers', '0',
               '--nb_classes', '2', '--finetune', pretrained, '--mixup', '0.8', '--cutmix', '1.0',
               '--output_dir', tmp_path / name, *extra)
        rows.append(read_log(tmp_path / name))
    assert rows[0] == rows[1] and [r['epoch'] for r in rows[0]] == [0, 1]
    assert math.isfinite(rows[0][-1]['train_loss'])


def test_pretrain_fast_flags_in_process(tmp_path):
    """main_pretrain with the fast path minus compile (fp32 on the CPU) and fast_cpu: the log rows are the
    reference's within the resampling differences."""
    rows = []
    for name, extra in (('ref', []), ('fast', ['--no_host_sync', '--fused_adamw', '--grad_checkpointing',
                                               '--data_loader', 'fast_cpu'])):
        run_ok(main_pretrain, *pretrain_argv(tmp_path / name, *extra)[1:])
        rows.append(read_log(tmp_path / name))
    assert [r['epoch'] for r in rows[1]] == [0, 1]
    for ours, ref in zip(*rows[::-1]):
        assert ours['train_lr'] == ref['train_lr']
        assert ours['train_loss'] == pytest.approx(ref['train_loss'], rel=1e-3)


# ---------------------------------------------------------------------------------------------------- input paths
def jpeg_file(path, size=(500, 375), seed=0, quality=90, mode='RGB'):
    """A photo-like JPEG: smooth colour gradients plus noise (a flat or random image would hide resampling)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([128 + 100 * np.sin(xx / (17 + 5 * c) + yy / 23 + c) for c in range(3)], -1)
    img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
    pil = Image.fromarray(img)
    (pil.convert(mode) if mode != 'RGB' else pil).save(path, quality=quality)
    return path


def reference_draws(path, n, seed):
    """(i, j, h, w, flip) as the reference's pretrain transform draws them."""
    img = Image.open(path)
    torch.manual_seed(seed)
    out = []
    for _ in range(n):
        i, j, h, w = transforms.RandomResizedCrop.get_params(img, (0.2, 1.0), (3 / 4, 4 / 3))
        out.append((i, j, h, w, int(torch.rand(1) < 0.5)))
    return out


def test_fast_crop_draws_the_reference_crops_and_distribution(tmp_path):
    path = jpeg_file(tmp_path / 'a.jpg')
    crop = fast_data.CropFlip(224, encoded=True)  # hands back its draws with the undecoded file
    torch.manual_seed(0)
    draws = [tuple(crop(path)[1].tolist()) for _ in range(2000)]
    assert draws == reference_draws(path, 2000, seed=0)  # the same stream: the same crops and flips
    # and their distribution is RandomResizedCrop's (checked against torchvision's draws from another seed)
    ref = np.array(reference_draws(path, 2000, seed=1), dtype=float)
    ours = np.array(draws, dtype=float)
    for d in (ours, ref):
        scale, log_ratio = d[:, 2] * d[:, 3] / (500 * 375), np.log(d[:, 3] / d[:, 2])
        assert scale.min() >= 0.2 - 0.01 and scale.max() <= 1.0
        assert log_ratio.min() >= math.log(3 / 4) - 0.02 and log_ratio.max() <= math.log(4 / 3) + 0.02
    stats = lambda d: (np.mean(d[:, 2] * d[:, 3] / (500 * 375)), np.mean(np.log(d[:, 3] / d[:, 2])),  # noqa: E731
                       d[:, 4].mean())
    (s, r, f), (s_ref, r_ref, f_ref) = stats(ours), stats(ref)
    assert abs(s - s_ref) < 0.03 and abs(r - r_ref) < 0.03 and abs(f - 0.5) < 0.04 and abs(f_ref - 0.5) < 0.04


def fast_and_reference(path, size, seed=0, **crop_kwargs):
    """The same draw through the reference's PIL transform and fast_cpu (normalised like the device does), in
    grey levels (0-255)."""
    reference = transforms.Compose([
        transforms.RandomResizedCrop(size, interpolation=transforms.InterpolationMode.BICUBIC,
                                     **{'scale': (0.2, 1.0), **crop_kwargs}),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])
    torch.manual_seed(seed)
    ref = reference(Image.open(path).convert('RGB'))
    torch.manual_seed(seed)
    fast = fast_data.normalise(fast_data.CropFlip(size, **crop_kwargs)(path)[None], torch.device('cpu'))[0]
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1) * 255
    return fast * std, ref * std


def test_identity_crop_matches_the_pil_path(tmp_path):
    """A crop of the whole image at its own size: no resampling, so only the JPEG decoders can differ
    (libjpeg-turbo through torchvision and through Pillow: the same pixels)."""
    path = jpeg_file(tmp_path / 'a.jpg', size=(64, 64))
    fast, ref = fast_and_reference(path, 64, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert (fast - ref).abs().max() < 1e-3


def test_resized_crop_matches_the_pil_path_closely(tmp_path):
    """A 500x375 JPEG cropped and resized to 224: torch's antialiased bicubic on uint8 is PIL's filter, in the same
    fixed-point arithmetic; a few values differ by a grey level or two (mean difference under 0.01)."""
    path = jpeg_file(tmp_path / 'a.jpg')
    for seed in range(5):
        fast, ref = fast_and_reference(path, 224, seed=seed)
        diff = (fast - ref).abs()
        assert diff.max() < 2.01 and diff.mean() < 0.01, (seed, diff.mean(), diff.max())


def test_reduced_size_decode_when_the_crop_allows(tmp_path, monkeypatch):
    """A crop at least twice the output size is decoded at 1/2, 1/4 or 1/8 in the DCT (PIL's draft), then
    resampled from the same window: close to the full-size path (the DCT's own downscaling differs a little)."""
    path = jpeg_file(tmp_path / 'big.jpg', size=(1024, 768))
    drafts = []
    original = fast_data.CropFlip._draft_crop
    monkeypatch.setattr(fast_data.CropFlip, '_draft_crop', lambda self, *a: drafts.append(a[1]) or original(self, *a))
    fast, ref = fast_and_reference(path, 128, scale=(0.9, 1.0))
    assert drafts == [4]  # a crop of 690 to 768 pixels a side, 128 out: decoded at 1/4
    diff = (fast - ref).abs()
    assert diff.mean() < 1.0 and diff.max() < 8, (diff.mean(), diff.max())  # measured: 0.5 and 3 grey levels


def test_other_files_take_the_pil_decoder(tmp_path):
    for name, mode in (('gray.jpg', 'L'), ('photo.png', 'RGB'), ('cmyk.jpg', 'CMYK')):
        path = jpeg_file(tmp_path / name, size=(80, 60), mode=mode)
        fast, ref = fast_and_reference(path, 32)
        diff = (fast - ref).abs()
        assert fast.shape == ref.shape == (3, 32, 32) and diff.mean() < 0.05 and diff.max() < 1.01, name


def test_jpeg_frame_reads_the_size_pil_reads(tmp_path):
    """The fast loader takes a JPEG's size from its frame header (not PIL's parser): the same (height, width) as PIL
    for the files decode_jpeg reads, None for the files that go to PIL."""
    pil = Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # an orientation tag: APP1 comes before the frame header
    pil.save(tmp_path / 'exif.jpg', exif=exif)
    pil.save(tmp_path / 'progressive.jpg', progressive=True, quality=95)
    pil.convert('L').save(tmp_path / 'gray.jpg')
    pil.convert('CMYK').save(tmp_path / 'cmyk.jpg')
    pil.save(tmp_path / 'image.png')
    files = sorted(tmp_path.iterdir()) + sorted(TINY.rglob('*.jpg'))[:4]
    for path in files:
        data = path.read_bytes()
        header = Image.open(path)
        plain = header.format == 'JPEG' and header.mode in ('RGB', 'L')
        assert fast_data.jpeg_frame(data) == ((header.size[1], header.size[0]) if plain else None), path.name
    assert fast_data.jpeg_frame(b'\xff\xd8\xff') is None and fast_data.jpeg_frame(b'') is None


def test_bad_files_are_named_or_skipped(tmp_path):
    root = tmp_path / 'data' / 'train' / 'a'
    root.mkdir(parents=True)
    jpeg_file(root / '0.jpg', size=(40, 40))
    data = (root / '0.jpg').read_bytes()
    (root / '1.jpg').write_bytes(data[:len(data) // 2])  # truncated
    args = parsed_args(main_pretrain, data_loader='fast_cpu', data_path=tmp_path / 'data', input_size=32,
                       skip_bad_images=False, batch_size=1, accum_iter=1, num_workers=0, pin_mem=False)
    dataset = train_loader(args, pretrain_transform(32), torch.device('cpu')).dataset
    with pytest.raises(errors.UsageError, match='1.jpg'):
        dataset[1]
    args.skip_bad_images = True
    x, _ = train_loader(args, pretrain_transform(32), torch.device('cpu')).dataset[1]
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8


def test_uint8_batches_are_normalised_on_the_device_as_totensor_normalize():
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    ref = transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)(images.float() / 255)
    assert torch.allclose(fast_data.normalise(images, torch.device('cpu')), ref, atol=1e-6)


def test_fast_loader_keeps_the_reference_data_order_and_random_streams(tmp_path):
    """The loader hands out the same images in the same order with the same crops as the reference's (same
    seed); its iterator exists as soon as iter() is called, as a DataLoader's (a resume restores the random
    streams right after)."""
    args = parsed_args(main_pretrain, data_loader='fast_cpu', data_path=TINY, input_size=32, skip_bad_images=False,
                       batch_size=4, accum_iter=1, num_workers=0, pin_mem=False)
    loader = train_loader(args, pretrain_transform(32), torch.device('cpu'))
    assert len(loader) == 4 and len(loader.dataset) == 16
    args.data_loader = 'pil'
    ref_loader = train_loader(args, pretrain_transform(32), torch.device('cpu'))
    assert list(loader.sampler) == list(ref_loader.sampler)
    torch.manual_seed(0)
    batches = iter(loader)
    after_iter = torch.get_rng_state()
    batches = list(batches)
    torch.manual_seed(0)
    ref_batches = iter(ref_loader)
    assert torch.equal(after_iter, torch.get_rng_state())
    for (x, y), (x_ref, y_ref) in zip(batches, list(ref_batches)):
        assert torch.equal(y, y_ref) and x.dtype == torch.float32 and x.shape == x_ref.shape
        assert (x - x_ref).abs().mean() < 0.05  # same crops; the resampling differs on 32x32 photos


def test_gpu_path_parts_run_on_the_cpu(tmp_path):
    """--data_loader gpu: workers hand over the JPEG bytes and the reference's draws; the batch is decoded together
    (nvJPEG on CUDA, libjpeg-turbo here), cropped, resized in float, flipped and normalised: within a few grey
    levels of fast_cpu's uint8 result (mean 0.4: float resampling, without PIL's rounding between the horizontal
    and vertical passes). Other files come already cropped. A torchvision before 0.19 (no batched decode_jpeg) is
    refused in one line before anything runs."""
    if not BATCHED_DECODE:
        with pytest.raises(errors.UsageError, match=r"--data_loader gpu decodes each batch's JPEGs in one call "
                                                    r"\(torchvision.io.decode_jpeg of a list, torchvision >= 0.19\); "
                                                    r"this torchvision is .*: upgrade torchvision"):
            check_data_loader(parsed_args(main_pretrain, data_loader='gpu', device='cuda'))
        return
    check_data_loader(parsed_args(main_pretrain, data_loader='gpu', device='cuda'))  # (no CUDA needed)
    paths = [jpeg_file(tmp_path / f'{k}.jpg', seed=k) for k in range(3)] + [
        jpeg_file(tmp_path / 'gray.png', size=(120, 90), mode='L')]
    torch.manual_seed(0)
    items = [fast_data.CropFlip(64, encoded=True)(p) for p in paths]
    assert [isinstance(x, tuple) for x in items] == [True, True, True, False]
    batch, targets = fast_data.collate_encoded([(x, k) for k, x in enumerate(items)])
    out = fast_data.decode_on_device(batch, torch.device('cpu'), 64)
    torch.manual_seed(0)
    ref = fast_data.normalise(torch.stack([fast_data.CropFlip(64)(p) for p in paths]), torch.device('cpu'))
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1) * 255
    diff = ((out - ref) * std).abs()
    assert out.shape == (4, 3, 64, 64) and targets.tolist() == [0, 1, 2, 3]
    assert diff.max() < 4 and diff.mean() < 0.6


def test_gpu_and_dali_loaders_say_what_is_missing():
    args = parsed_args(main_pretrain, data_loader='gpu', device='cpu')
    with pytest.raises(errors.UsageError, match='--data_loader gpu decodes on a CUDA GPU and --device is cpu'):
        check_data_loader(args)
    args.data_loader, args.device = 'dali', 'cuda'
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        with pytest.raises(errors.UsageError, match='pip install nvidia-dali-cuda130'):
            check_data_loader(args)
    check_data_loader(parsed_args(main_pretrain, data_loader='fast_cpu', device='cpu'))


def test_a_torchvision_without_jpeg_decoding_stops_only_the_fast_loaders(tmp_path):
    """torchvision deprecated torchvision.io's decoders (0.29): once they are gone the scripts still import, and
    --data_loader fast_cpu says what is missing before anything runs."""
    run = ("import sys, torchvision.io, torchvision.transforms.v2; del torchvision.io.decode_jpeg; "
           "import main_pretrain, util.training.process as process; "
           "process.run_main(main_pretrain.main, main_pretrain.get_args_parser(), sys.argv[1:])")
    result = run_script('-c', run, *pretrain_argv(tmp_path / 'out', '--data_loader', 'fast_cpu')[1:])
    assert one_line_error(result).startswith(
        'error: --data_loader fast_cpu decodes with torchvision.io.decode_jpeg, which this torchvision (')
    assert not (tmp_path / 'out').exists()


# ---------------------------------------------------------------------------------------------------- one recipe
def loader_args(kind, **extra):
    return parsed_args(main_pretrain, data_loader=kind, data_path=TINY, input_size=32, skip_bad_images=False,
                       batch_size=4, accum_iter=1, num_workers=0, pin_mem=False, **extra)


def with_grayscale(make_transform):
    """``make_transform`` with the line a researcher adds to util/datasets.py: a random grayscale after the flip."""
    def patched(*a, **k):
        transform = make_transform(*a, **k)
        transform.transforms.insert(2, transforms.RandomGrayscale(p=0.2))
        return transform
    return patched


def test_the_fast_loaders_read_the_augmentation_from_the_pil_transform():
    """Crop size, scale, ratio and draw, flip probability and normalisation come from the one definition in
    util/datasets.py: pre-training's and linear probing's (TF-style crop) as today, and a changed setting follows."""
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    assert fast_data.augmentation(pretrain_transform(224, list(mean), list(std)), 'fast_cpu') == (dict(
        size=224, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), get_params=transforms.RandomResizedCrop.get_params,
        flip=0.5), mean, std)
    crop, *_ = fast_data.augmentation(linprobe_transform(64), 'gpu')
    assert crop == dict(size=64, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                        get_params=util.crop.RandomResizedCrop.get_params, flip=0.5)
    # a researcher's edit of the pil transform: a larger minimum scale, no flip
    edited = pretrain_transform(32)
    edited.transforms[0].scale = (0.5, 1.0)
    del edited.transforms[1]
    worker = train_loader(loader_args('fast_cpu'), edited, torch.device('cpu')).dataset.loader
    assert (worker.scale, worker.flip) == ((0.5, 1.0), None)
    path = sorted(TINY.rglob('*.jpg'))[0]
    torch.manual_seed(0)
    worker(path)
    after = torch.get_rng_state()
    torch.manual_seed(0)
    edited(Image.open(path).convert('RGB'))
    assert torch.equal(after, torch.get_rng_state())  # no flip: no flip draw, on either path


@pytest.mark.parametrize('make_transform, kinds', [
    ('pretrain_transform', ('fast_cpu', 'gpu', 'dali')), ('linprobe_transform', ('fast_cpu',))])
def test_a_step_added_to_the_pil_transform_is_refused_by_name_by_every_fast_loader(monkeypatch, make_transform,
                                                                                    kinds):
    monkeypatch.setattr(datasets, make_transform, with_grayscale(getattr(datasets, make_transform)))
    transform = getattr(datasets, make_transform)(32)
    for kind in kinds:
        with pytest.raises(errors.UsageError) as e:
            train_loader(loader_args(kind, device='cuda'), transform, torch.device('cpu'))
        assert str(e.value) == (f"--data_loader {kind} cannot apply RandomGrayscale(p=0.2) (the training transform "
                                f"of util/datasets.py): use --data_loader pil, or implement it in util/data/fast_data.py")
    # the pil path applies it: about one image in five comes out grey (equal channels before normalisation)
    dataset = train_loader(loader_args('pil'), transform, torch.device('cpu')).dataset
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
    torch.manual_seed(0)
    pixels = [dataset[k % len(dataset)][0] * std + mean for k in range(40)]
    grey = sum(bool((x - x[:1]).abs().max() < 1e-5) for x in pixels)
    assert 2 <= grey <= 16, grey


def test_settings_a_loader_cannot_apply_are_refused_by_name():
    bilinear = pretrain_transform(32)
    bilinear.transforms[0].interpolation = transforms.InterpolationMode.BILINEAR
    with pytest.raises(errors.UsageError, match=r"--data_loader gpu cannot apply RandomResizedCrop\(size=\(32, 32\).*"
                                                r"interpolation=bilinear.* \(it resizes to a square, bicubic, antialiased\)"):
        fast_data.augmentation(bilinear, 'gpu')
    with pytest.raises(errors.UsageError, match=r"--data_loader dali cannot apply RandomResizedCrop\(size=\(32, 32\), "
                                                r"scale=\(0.08, 1.0\)"):
        fast_data.augmentation(linprobe_transform(32), 'dali')  # DALI draws its own crops, torchvision's way
    swapped = pretrain_transform(32)
    swapped.transforms[:2] = swapped.transforms[1::-1]
    with pytest.raises(errors.UsageError, match=r"--data_loader fast_cpu cannot apply RandomHorizontalFlip, "
                                                r"RandomResizedCrop, ToTensor, Normalize in this order"):
        fast_data.augmentation(swapped, 'fast_cpu')


def test_an_added_step_stops_main_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(main_pretrain, 'pretrain_transform', with_grayscale(pretrain_transform))
    out = tmp_path / 'out'
    code, err = run_in_process(main_pretrain, capsys, *pretrain_argv(out, '--data_loader', 'fast_cpu')[1:])
    assert code == 2 and err.strip().splitlines()[-1] == (
        "error: --data_loader fast_cpu cannot apply RandomGrayscale(p=0.2) (the training transform of "
        "util/datasets.py): use --data_loader pil, or implement it in util/data/fast_data.py")
    assert not (out / 'log.txt').exists() and not list(out.glob('checkpoint*'))


# ---------------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_main_pretrain_fast_end_to_end(tmp_path):
    """--fast on the CPU (compiles the tiny model: about a minute): exits 0 with finite, decreasing-ish log rows."""
    out = tmp_path / 'run'
    r = run_script(*pretrain_argv(out, '--fast', '--data_loader', 'fast_cpu', epochs=3), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_log(out)
    assert [row['epoch'] for row in rows] == [0, 1, 2]
    assert all(math.isfinite(row['train_loss']) and 0.3 < row['train_loss'] < 5 for row in rows)
    assert 'fused_adamw=True' in r.stdout and 'compile=True' in r.stdout
