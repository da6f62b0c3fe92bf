"""Parts 3 and 4, speed: bench_step.py's training-step table and bench_input.py's input table, run as scripts
and read back from their Markdown rows; and, while part 2 runs on a large GPU, the compile warm-up that fills
torch.compile's caches for part 3."""
import re
import threading


def start_background(ctx):
    """While part 2 runs (GPU only): bench_input.py makes its JPEGs, and each compiled row of part 3 runs once for a
    step, filling torch.compile's caches, 2 at a time, on a GPU of 120 GiB or more (an H200; on 80 GB, part 2's
    runs, about 50 GiB together, leave too little room for them)."""
    plan, threads = ctx.plan, []
    if 'input' in ctx.parts:
        argv = ['benchmarks/bench_input.py', '--workers', '0', '--loaders', 'fast_cpu', '--device', 'cpu',
                '--images', plan['input_images'], '--cache', ctx.work / 'input_cache',
                '--cifar', ctx.cifar or '/nonexistent']
        ctx.background['input_images'] = threading.Thread(target=lambda: ctx.background_jobs.append(
            ctx.runner.run('input_images', argv, ctx.budget.left('input'), tag='input')), daemon=True)
        threads.append(ctx.background['input_images'])
    memory = ctx.env.get('gpu_memory_gib') or 0
    slots = 2 if memory >= 120 else 0
    if 'steps' in ctx.parts and slots:
        rows = [(roles, models, batches, [p for p in paths if p in ('fast', 'fast_ckpt')])
                for roles, models, batches, paths in plan['step_items']]
        queue = [row for row in rows if row[3]]
        lock = threading.Lock()

        def warm():
            while True:
                with lock:
                    if not queue or ctx.stop_warming.is_set():
                        return
                    roles, models, batches, paths = queue.pop(0)
                ctx.background_jobs.append(ctx.runner.run(
                    f"compile_warmup_{'_'.join(roles)}", ['benchmarks/bench_step.py', '--models', *models,
                                                          '--batch_sizes', *batches, '--paths', *paths, '--warmup',
                                                          '1', '--steps', '1'],
                    ctx.budget.left('correctness') + 30, {'TORCHINDUCTOR_COMPILE_THREADS': '4'}, tag='warm'))
        ctx.warmers = [threading.Thread(target=warm, daemon=True) for _ in range(slots)]
        threads += ctx.warmers
    for t in threads:
        t.start()


STEP_ROW = re.compile(r'^\| (\S+) \| (\d+) \| (\w+) \| ([\d.]+) \| ([\d.]+) \| ([\d.e+-]+) \| (\d+)% \| ([^|]*) \|$')
OOM_ROW = re.compile(r'^\| (\S+) \| (\d+) \| (\w+) \| OOM \|')


def parse_bench_step(text):
    rows, peaks = [], {}
    for line in text.splitlines():
        m = STEP_ROW.match(line.strip())
        if m:
            mem = re.match(r'([\d.]+) GiB', m.group(8).strip())
            rows.append(dict(model=m.group(1), batch=int(m.group(2)), path=m.group(3), img_s=float(m.group(4)),
                             ms=float(m.group(5)), tflops=float(m.group(6)), of_peak=int(m.group(7)) / 100,
                             memory_gib=float(mem.group(1)) if mem else None))
        elif OOM_ROW.match(line.strip()):
            m = OOM_ROW.match(line.strip())
            rows.append(dict(model=m.group(1), batch=int(m.group(2)), path=m.group(3), oom=True))
        elif line.startswith('matmul peaks measured:'):
            peaks = {k: float(v) for k, v in re.findall(r'(\w+) ([\d.]+) TFLOP/s', line)}
    return rows, peaks


def part_steps(ctx):
    ctx.stop_warming.set()
    for t in ctx.warmers:  # nothing else may use the GPU while it is timed
        while t.is_alive():
            ctx.runner.kill_tagged('warm')
            t.join(0.5)
    warmed = [j.to_json() for j in ctx.background_jobs if j.name.startswith('compile_warmup')]
    ctx.part['compile_warmups'] = [dict(name=j['name'], done=j['rc'] == 0, seconds=j['seconds']) for j in warmed]
    ctx.part['rows'], ctx.part['items'] = [], []
    for roles, models, batches, paths in ctx.plan['step_items']:
        argv = ['benchmarks/bench_step.py', '--models', *models, '--batch_sizes', *batches, '--paths', *paths,
                *ctx.plan['step_args']]
        job = ctx.runner.run(f"bench_step_{'_'.join(roles)}", argv, ctx.budget.left('steps'),
                             ctx.plan['compile_env'])
        rows, peaks = parse_bench_step(job.output)
        role_of = {(m, b): r for r, m, b in zip(roles, models, batches)}
        for r in rows:
            r['role'] = role_of.get((r['model'], r['batch']))
        ctx.part['rows'] += rows
        done = {(r['model'], r['batch'], r['path']) for r in rows}
        missing = [f'{m} {p}' for m, b in zip(models, batches) for p in paths if (m, b, p) not in done]
        item = dict(roles=roles, models=models, batches=batches, paths=paths, job=job.to_json(), matmul_peaks=peaks,
                    missing=missing, status='ok' if job.ok and not missing else 'failed')
        if missing:
            item['detail'] = f"not measured: {', '.join(missing)} ({job.note or job.summary()})"
            if job.output and not job.timed_out:
                item['tail'] = job.tail()
        ctx.part['items'].append(item)
    if any(i['status'] != 'ok' for i in ctx.part['items']):
        ctx.part['status'] = 'failed'


def parse_bench_input(text):
    out, loaders = dict(table=[], end_to_end=[]), []
    e2e = False
    for line in text.splitlines():
        line = line.strip()
        m = re.match(r'JPEG decode alone, 1 core: ([\d.]+) img/s', line)
        if m:
            out['decode_alone_img_s'] = float(m.group(1))
        if line.startswith('| workers |'):
            loaders = [c.split(' img/s')[0].strip() for c in line.strip('|').split('|')[1:-1]]
        elif re.match(r'^\| \d+ \|', line) and loaders:
            cells = [c.strip() for c in line.strip('|').split('|')]
            row = dict(workers=int(cells[0]))
            for kind, cell in zip(loaders, cells[1:]):
                m = re.match(r'([\d.]+) \(([\d.]+)\)', cell)
                row[kind] = float(m.group(1)) if m else None
            out['table'].append(row)
        elif line.startswith('end to end:'):
            e2e, out['end_to_end_setup'] = True, line
        elif e2e:
            m = re.match(r'^\| (.+?) \| ([\d.]+) img/s \|$', line)
            if m:
                out['end_to_end'].append(dict(input=m.group(1), img_s=float(m.group(2))))
    return out


def part_input(ctx):
    t = ctx.background.get('input_images')
    if t is not None:  # its JPEGs, made while part 2 ran
        t.join(max(0.0, ctx.budget.left('input') - 20))
    loaders = list(ctx.plan['input_loaders'])
    if ctx.plan['dali'] and ctx.env.get('dali'):
        loaders.append('dali')
    common = ['--loaders', *loaders, '--images', ctx.plan['input_images'], '--cache', ctx.work / 'input_cache',
              '--cifar', ctx.cifar or '/nonexistent']
    ctx.part['runs'] = []
    for name, args in ctx.plan['input_runs']:
        job = ctx.runner.run(f'bench_input_{name}', ['benchmarks/bench_input.py', *args, *common],
                             ctx.budget.left('input'))
        parsed = parse_bench_input(job.output)
        run = dict(name=name, job=job.to_json(), **parsed, status='ok')
        expected = parsed['table'] and all(all(r.get(k) for k in loaders) for r in parsed['table'])
        if name == 'end_to_end':
            expected = expected and len(parsed['end_to_end']) == len(loaders) + 1
        if not job.ok or not expected:
            run.update(status='failed', detail=job.summary(), tail=job.tail())
            ctx.part['status'] = 'failed'
        ctx.part['runs'].append(run)
