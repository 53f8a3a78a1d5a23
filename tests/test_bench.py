"""bench.py end to end on a very small model: a row per stage, every figure finite and positive.
Not a timing test: the numbers themselves depend on the machine and its load."""
import itertools
import math

from scripts import function_defs, run_script

ROWS = ['sft', 'rm', 'dpo', 'dpo_ref_precomputed', 'ppo_rollout_no_kv_cache', 'ppo_rollout_hf_generate',
        'ppo_rollout', 'ppo_score',
        'ppo_update_1x1', 'ppo_iteration_1x1', 'ppo_update_4x1', 'ppo_iteration_4x1',
        'ppo_update_4x2', 'ppo_iteration_4x2']


def test_bench_prints_a_row_per_stage():
    # a given peak: the measured one is a few seconds of large matmuls (measure_peak_flops is tested below)
    p = run_script('bench.py', '--steps=1', '--warmup=0', '--n_layer=1', '--n_head=2', '--n_embd=32',
                   '--vocab_size=512', '--batch_size=4', '--prompt_len=8', '--response_len=8', '--threads=1',
                   '--decode=static', '--grad_checkpoint=True', '--peak_flops=2e6', timeout=300)
    # the static-shape rollout and checkpointed training passes (model tests cover the defaults)
    lines = p.stdout.splitlines()
    first = next(line for line in lines if line.startswith('bench:'))
    assert first.startswith('bench: preset tiny, cpu, 1 threads, float32, grad checkpointing; GPT 1L/2H/32d'), first
    assert 'peak for MFU: 0.0 GFLOP/s (given)' in lines, p.stdout
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ['stage', 's/step'])
    table = {line.split()[0]: line.split()[1:] for line in lines[header + 1:] if line.strip()}
    assert list(table) == ROWS, p.stdout
    for name, cells in table.items():
        sec, tokens, tokens_per_s, mem, mfu = cells
        assert mfu.endswith('%'), (name, cells)
        numbers = [float(sec), int(tokens), float(tokens_per_s), float(mem), float(mfu[:-1])]
        assert all(math.isfinite(x) and x > 0 for x in numbers), (name, cells)
        assert int(tokens) == 4 * 16 * (2 if name in ('rm', 'dpo', 'dpo_ref_precomputed') else 1), (name, cells)
        # a 2 MFLOP/s peak: any real step of this model is far above 100%
        assert float(mfu[:-1]) > 100, (name, cells)


def test_measure_peak_flops_is_the_best_timed_round_after_the_warmup():
    n, reps = 64, 2
    ticks = itertools.accumulate([0.0, 0.01, 5.0, 1.0, 4.0, 0.5, 2.0, 3.0, 6.0, 7.0, 8.0, 9.0])  # start, end of each round
    marks = iter(list(ticks))
    (measure,) = function_defs('bench.py', 'measure_peak_flops', PEAK_MATMUL=(n, reps), dtype='float32', device='cpu',
                               clock=lambda: next(marks))
    # six rounds of 0.01 (the warm-up, left out), 1.0, 0.5, 3.0, 7.0, 9.0 s (start and end marks alternate)
    assert math.isclose(measure(), 2 * n ** 3 / (0.5 / reps), rel_tol=1e-12)
