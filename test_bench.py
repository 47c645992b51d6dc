"""benchmark.py: the benchmark table, its errors and its load meter."""
import math
import statistics
import subprocess
import sys

import pytest
import torch

import benchmark

from testkit import train_env


@pytest.mark.slow
def test_bench_end_to_end_prints_the_table(capsys):
    args = benchmark.get_args_parser().parse_args(
        ['--family', 'vit', '--vit-model', 'vit_tiny', '--vit-pe', 'ape', 'rope_mixed',
         '--resolutions', '32', '--batch-size', '2', '--reps', '2', '--warmup', '1', '--threads', '2'])
    tables = benchmark.main(args)
    out = capsys.readouterr().out
    assert len(tables) == 2  # infer, train
    for table in tables:
        assert table in out
        lines = [line for line in table.splitlines() if line.startswith('|')]
        header = [c.strip() for c in lines[0].strip('|').split('|')]
        assert header[:4] == ['model', 'ms/step median', 'ms/step min', 'spread']
        assert {'img/s', 'peak MiB', 'RoPE share', 'time / ape', 'memory / ape', 'speed-up vs timm'} <= set(header)
        rows = {cells[0]: dict(zip(header, cells)) for cells in
                ([c.strip() for c in line.strip('|').split('|')] for line in lines[2:])}
        assert list(rows) == ['ape', 'rope_mixed']
        assert rows['ape']['time / ape'] == '1.000' and rows['ape']['RoPE share'] == '0.00 %'
        share = float(rows['rope_mixed']['RoPE share'].rstrip(' %'))
        assert 0 < share < 100  # the labelled RoPE code is found by the profiler
        assert float(rows['rope_mixed']['peak MiB']) > 0 and float(rows['rope_mixed']['img/s']) > 0
        assert 'other processes used' in table


def test_bench_format_table_ratios():
    args = benchmark.get_args_parser().parse_args(['--batch-size', '4'])

    def row(t_min, peak):
        return dict(times=[t_min], median=t_min * 1.1, min=t_min, spread=0.1, share=0.005, peak=peak * 2 ** 20)
    rows = {'ape': row(1.0, 100), 'rope_mixed': row(1.02, 104), 'timm:rope_mixed': row(1.2, 130)}
    table = benchmark.format_table('vit', 384, 'train', rows, args, 0.05, None)
    mixed = next(line for line in table.splitlines() if line.startswith('| rope_mixed'))
    cells = [c.strip() for c in mixed.strip('|').split('|')]
    assert cells[4] == f'{4 / 1.02:.1f}'  # img/s from the minimum
    assert cells[6] == '0.50 %' and cells[7] == '1.020' and cells[8] == '1.040'
    assert cells[9] == f'{1.2 / 1.02:.2f}x'  # timm time / ours
    assert '0.05 cores' in table


@pytest.mark.slow
def test_bench_bad_resolution_is_one_line_error():
    proc = subprocess.run([sys.executable, 'benchmark.py', '--family', 'vit', '--resolutions', '30'],
                          capture_output=True, text=True, timeout=120, env=train_env())
    assert proc.returncode == 2
    assert proc.stderr.startswith('error: --resolutions 30') and proc.stderr.count('\n') == 1
    assert 'Traceback' not in proc.stderr


def test_bench_load_meter_and_bounded_wait():
    meter = benchmark.LoadMeter().start()
    sum(i * i for i in range(100000))  # some work of our own, which must not count as load
    load = meter.stop()
    assert math.isnan(load) or 0 <= load <= (torch.get_num_threads() + 64)
    budget = [0.0]
    benchmark.wait_quiet(budget, threshold=1e9, window=0.05)  # quiet at once: returns after one window
    assert budget[0] <= 0


def test_bench_loader_table_rates_ratios_and_bytes(tmp_path):
    # benchmark_loader.py on 3 small generated JPEGs: every pipeline timed in every repetition,
    # the training ones a uint8 crop and a plan (about a quarter of the float32 bytes), the
    # device's half timed apart, ratios against their peers.
    import io
    import benchmark_loader
    paths = benchmark_loader.make_images(str(tmp_path), 3)
    assert len(paths) == 3 and all(p.endswith('.jpg') for p in paths)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # per core, as main() runs it
    try:
        results = benchmark_loader.run(paths, 32, reps=2)
    finally:
        torch.set_num_threads(threads)
    assert set(results) == {'deit3', 'deit3 official', 'deit3 before #30', 'swin',
                            'swin before #30', 'eval', 'eval official', 'deit3 device half',
                            'swin device half'}
    assert all(len(r['rates']) == 2 and min(r['rates']) > 0 for r in results.values())
    # the workers' training samples: a uint8 crop and a plan of 9 float64 numbers per recipe
    assert results['deit3']['sample_bytes'] == 3 * 32 * 32 + 9 * 8
    assert results['swin']['sample_bytes'] == 3 * 32 * 32 + 9 * 8
    assert results['deit3 official']['sample_bytes'] == 4 * 3 * 32 * 32   # float32
    out = io.StringIO()
    benchmark_loader.report(results, 3, 2, out=out)
    line = next(l for l in out.getvalue().splitlines() if l.startswith('deit3 '))
    assert f"{(3 * 32 * 32 + 72) * 256:,d} x256" in line and 'vs deit3 official' in line
    ratio = statistics.median(results['deit3']['rates']) / statistics.median(results['deit3 official']['rates'])
    assert line.endswith(f'{ratio:.2f}x')
