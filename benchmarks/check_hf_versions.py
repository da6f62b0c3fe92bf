"""Check that export.py --to hf folders load in two transformers versions, whichever wrote them (docs/evaluation-and-
export.md): run before a release, with a second virtualenv holding another transformers (e.g. 4.46.3 beside 5.x).

    python3 -m venv /tmp/venv-tf4 && /tmp/venv-tf4/bin/pip install torch timm transformers==4.46.3 numpy pillow
    python benchmarks/check_hf_versions.py --other_python /tmp/venv-tf4/bin/python

A tiny MAE (random weights, norm_pix_loss, its own --mean/--std) is exported by each Python, as a full
ViTMAEForPreTraining folder and with --hf_encoder_only; each Python then loads each folder and reports: missing and
unexpected keys (none expected), the loss for a fixed ``noise`` against ours (computed here), the encoder's output
against ours, and the image processor's mean. Prints one line per (writer, reader) pair; exit code 1 on a mismatch.
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import models_mae  # noqa: E402

MEAN, STD = [0.3, 0.4, 0.5], [0.2, 0.25, 0.3]

# what a reader runs: no module of this project, only torch and transformers
READ = r'''
import json, sys, torch, transformers
folder, inputs = sys.argv[1], torch.load(sys.argv[2])
out = {'version': transformers.__version__}
full, info = transformers.ViTMAEForPreTraining.from_pretrained(folder + '/full', output_loading_info=True)
enc, info_enc = transformers.ViTMAEModel.from_pretrained(folder + '/encoder', output_loading_info=True)
for name, i in (('full', info), ('encoder', info_enc)):
    out[name] = sorted(i['missing_keys']) + sorted(i['unexpected_keys']) + sorted(i.get('mismatched_keys', []))
with torch.no_grad():
    out['loss'] = full.eval()(pixel_values=inputs['x'], noise=inputs['noise']).loss.item()
    latent = enc.eval()(pixel_values=inputs['x'], noise=inputs['noise']).last_hidden_state
out['latent_diff'] = (latent - inputs['latent']).abs().max().item()
out['mean'] = list(transformers.AutoImageProcessor.from_pretrained(folder + '/full').image_mean)
print('RESULT ' + json.dumps(out))
'''


def write(python, checkpoint, folder):
    for name, extra in (('full', []), ('encoder', ['--hf_encoder_only'])):
        subprocess.run([python, str(ROOT / 'export.py'), '--checkpoint', str(checkpoint), '--to', 'hf',
                        '--out', str(folder / name)] + extra, check=True, capture_output=True, text=True)


def read(python, folder, inputs):
    done = subprocess.run([python, '-c', READ, str(folder), str(inputs)], capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith('RESULT ')]
    if done.returncode or not lines:
        raise SystemExit(f"{python} could not read {folder}:\n{done.stderr[-2000:]}")
    return json.loads(lines[-1][len('RESULT '):])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--other_python', required=True, help='the Python of a virtualenv with another transformers')
    args = parser.parse_args()
    pythons = {'this': sys.executable, 'other': args.other_python}
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        mae = models_mae.mae_vit_tiny_patch4(norm_pix_loss=True).eval()
        with torch.no_grad():  # trained-looking weights: no zero biases, no unit norms
            for p in mae.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.05)
        flags = {'model': 'mae_vit_tiny_patch4', 'input_size': 32, 'norm_pix_loss': True, 'mean': MEAN, 'std': STD}
        torch.save({'model': mae.state_dict(), 'args': flags}, tmp / 'checkpoint.pth')
        x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        noise = torch.rand(3, 64, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            loss = mae(x, mask_ratio=0.75, noise=noise)[0].item()
            latent = mae.forward_encoder(x, 0.75, noise)[0]
        torch.save({'x': x, 'noise': noise, 'latent': latent}, tmp / 'inputs.pt')
        for writer, python in pythons.items():
            write(python, tmp / 'checkpoint.pth', tmp / writer)
        for writer in pythons:
            for reader, python in pythons.items():
                r = read(python, tmp / writer, tmp / 'inputs.pt')
                ok = (not r['full'] and not r['encoder'] and abs(r['loss'] - loss) <= 1e-5 * abs(loss) + 1e-6
                      and r['latent_diff'] < 1e-4 and r['mean'] == MEAN)
                failed |= not ok
                print(f"{'ok  ' if ok else 'FAIL'} written by {writer} ({pythons[writer]}), read by transformers "
                      f"{r['version']}: missing/unexpected keys {r['full'] + r['encoder'] or 'none'}; loss "
                      f"{r['loss']:.6f} (ours {loss:.6f}, difference {abs(r['loss'] - loss):.1e}); encoder max "
                      f"difference {r['latent_diff']:.1e}; processor mean {r['mean']}")
    sys.exit(1 if failed else 0)


if __name__ == '__main__':
    main()
