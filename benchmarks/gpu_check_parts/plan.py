"""What the GPU check runs: its parts, their share of the budget, and the plan of each part on a GPU and in
--smoke."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PARTS = ('env', 'correctness', 'steps', 'input')
TITLES = {'env': '1. Environment', 'correctness': '2. Correctness', 'steps': '3. Training steps (bench_step.py)',
          'input': '4. Input pipeline (bench_input.py)'}
SHARES = {'env': 30, 'correctness': 170, 'steps': 190, 'input': 90}  # seconds of the default budget of 480

# what each part runs, on a GPU and in --smoke; 'role' names a row the targets read
GPU_PLAN = dict(
    device='cuda', budget=480, slots=10, threads=2, image_size=(500, 375), train_per_class=52, val_per_class=10,
    mae='mae_vit_base_patch16', vit='vit_base_patch16', input_size=224, batch=32, epochs=2, save_every=8,
    finetune_batch=32, linprobe_batch=64, workers=6,
    paths=[('default', [], 'fp16'), ('fast', ['--fast'], 'bf16'), ('gpu', ['--data_loader', 'gpu'], 'fp16')],
    dali=True, compile_env={'TORCH_LOGS': 'recompiles'},
    step_args=['--warmup', '3', '--steps', '10'], step_items=[  # (roles, models, batches, paths), in this order
        (['mae_L'], ['mae_vit_large_patch16'], [128], ['faithful', 'fast_eager', 'fast']),
        (['ft_L'], ['vit_large_patch16'], [64], ['faithful', 'fast_eager', 'fast']),
        (['mae_B'], ['mae_vit_base_patch16'], [256], ['faithful', 'fast_eager', 'fast']),
        (['mae_H'], ['mae_vit_huge_patch14'], [64], ['faithful', 'fast_eager', 'fast']),
        (['mae_H256'], ['mae_vit_huge_patch14'], [256], ['fast_ckpt']),
        (['ft_B'], ['vit_base_patch16'], [128], ['faithful', 'fast_eager', 'fast']),
        (['ft_H'], ['vit_huge_patch14'], [32], ['faithful', 'fast_eager', 'fast'])],
    input_images=4096, input_runs=[  # the table at batch 32; end to end at ViT-L's batch (it prints a table too)
        ('table', ['--workers', '16', '--batch_size', '32']),
        ('end_to_end', ['--workers', '16', '--batch_size', '128', '--train', 'mae_vit_large_patch16',
                        '--train_steps', '60'])],
    input_loaders=['pil', 'fast_cpu', 'gpu'])
SMOKE_PLAN = dict(
    device='cpu', budget=1500, slots=2, threads=1, image_size=(64, 48), train_per_class=5, val_per_class=2,
    mae='mae_vit_tiny_patch4', vit='vit_tiny_patch4', input_size=32, batch=4, epochs=2, save_every=4,
    finetune_batch=4, linprobe_batch=8, workers=0,
    paths=[('default', [], 'fp32'), ('fast', ['--fast', '--data_loader', 'fast_cpu'], 'fp32')],
    dali=False, compile_env={'TORCH_COMPILE_DISABLE': '1'},
    step_args=['--warmup', '1', '--steps', '2', '--input_size', '32', '--device', 'cpu'], step_items=[
        (['mae_L', 'ft_L'], ['mae_vit_tiny_patch4', 'vit_tiny_patch4'], [8, 8], ['faithful', 'fast_eager', 'fast']),
        (['mae_H256'], ['mae_vit_tiny_patch4'], [16], ['fast_ckpt'])],
    input_images=32, input_runs=[
        ('end_to_end', ['--workers', '2', '--batch_size', '8', '--input_size', '32', '--device', 'cpu', '--train',
                        'mae_vit_tiny_patch4', '--train_steps', '3'])],
    input_loaders=['pil', 'fast_cpu'])
