"""Cost of one VoxShield noise update over a whole case, relative to nnU-Net's own sliding-window prediction.

Speed: on one case, in one process, the time of one full noise update (sliding-window forward, Dice+CE and semantic
disruption loss, tile-by-tile input gradient, signed step) divided by the time of
nnUNetPredictor.predict_sliding_window_return_logits (no mirroring, same network, same tile step). Target <= 3.5.
Repetitions are interleaved and the minimum of each is used. On CUDA the ratio is of wall times; on CPU it is of
process CPU times with one torch thread (wall times are recorded too), because the small shared machines this runs
on are loaded by other processes and the wall clock then measures the neighbours.
Memory: peak of one noise update at two case sizes 8x apart in voxels, each in a fresh subprocess (CUDA:
max_memory_allocated; CPU: peak RSS above the RSS before the update). Target: growth < 1.5x.

The network is nnU-Net's default 3d_fullres PlainConvUNet for isotropic 1 mm data, 4 labels: topology from nnU-Net's
get_pool_and_conv_props (bottleneck >= 4 voxels), features 32 doubling to at most 320, two convolutions per stage,
instance norm, leaky ReLU, built by get_network_from_plans from a plans dict shaped like the planner's.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from sliding_window import sliding_window_backward, sliding_window_logits  # beside this script

N_LABELS = 4
EPS = 4 / 255 * 10  # the released budget in nnU-Net z-score units (+-5 sigma window mapped to [0, 1])
STEP = EPS / 4
LAMBDA_S = 0.05
SPEED_TARGET = 3.5
MEMORY_GROWTH_TARGET = 1.5


def default_3d_fullres_plans(patch_edge: int) -> dict:
    """A plans dict with the 3d_fullres configuration nnU-Net's planner makes for isotropic 1 mm data."""
    _, strides, kernels, patch_size, _ = get_pool_and_conv_props((1., 1., 1.), (patch_edge,) * 3, 4, 999999)
    n_stages = len(strides)
    arch_kwargs = {
        'n_stages': n_stages, 'features_per_stage': [min(32 * 2 ** i, 320) for i in range(n_stages)],
        'conv_op': 'torch.nn.modules.conv.Conv3d', 'kernel_sizes': kernels, 'strides': strides,
        'n_conv_per_stage': [2] * n_stages, 'n_conv_per_stage_decoder': [2] * (n_stages - 1), 'conv_bias': True,
        'norm_op': 'torch.nn.modules.instancenorm.InstanceNorm3d', 'norm_op_kwargs': {'eps': 1e-5, 'affine': True},
        'dropout_op': None, 'dropout_op_kwargs': None,
        'nonlin': 'torch.nn.LeakyReLU', 'nonlin_kwargs': {'inplace': True},
    }
    return {'configurations': {'3d_fullres': {
        'patch_size': [int(p) for p in patch_size],
        'architecture': {'network_class_name': 'dynamic_network_architectures.architectures.unet.PlainConvUNet',
                         'arch_kwargs': arch_kwargs,
                         '_kw_requires_import': ['conv_op', 'norm_op', 'dropout_op', 'nonlin']}}}}


def planned(patch_edge: int):
    """PlansManager and 3d_fullres ConfigurationManager for a cubic patch (nnU-Net may round the edge up)."""
    plans = PlansManager(default_3d_fullres_plans(patch_edge))
    return plans, plans.get_configuration('3d_fullres')


def build(patch_edge: int, n_channels: int, device: torch.device):
    """The network, its patch size, and an nnUNetPredictor wrapping the same network (no mirroring, step 0.5)."""
    plans, config = planned(patch_edge)
    torch.manual_seed(0)
    network = get_network_from_plans(config.network_arch_class_name, config.network_arch_init_kwargs,
                                     config.network_arch_init_kwargs_req_import, n_channels, N_LABELS,
                                     deep_supervision=False).to(device).eval()
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False, device=device,
                                allow_tqdm=False)
    dataset_json = {'labels': {'background': 0, **{f'label{i}': i for i in range(1, N_LABELS)}}}
    predictor.manual_initialization(network, plans, config, None, dataset_json, 'nnUNetTrainer', None)
    return network, tuple(config.patch_size), predictor


class Case:
    """A synthetic case: image, labels, foreground ROI, current perturbation; clean logits once a surrogate ran."""

    def __init__(self, edge: int, n_channels: int, device):
        g = torch.Generator().manual_seed(edge)
        self.image = torch.randn(n_channels, edge, edge, edge, generator=g).to(device)
        self.labels = torch.randint(0, N_LABELS, (1, 1, edge, edge, edge), generator=g).to(device)
        self.roi = (self.labels[0] > 0).float()
        self.delta = ((torch.rand(n_channels, edge, edge, edge, generator=g) * 2 - 1) * EPS).to(device) * self.roi
        self.clean_logits = None

    def with_clean_logits(self, network, patch_size):
        """SPD compares with the surrogate's logits on the clean case: computed once per round, not per update."""
        self.clean_logits = sliding_window_logits(network, self.image, patch_size)
        return self


def noise_update(network, patch_size, case: Case, seg_loss) -> float:
    """One error-minimising step with semantic disruption on the whole case; returns its loss."""
    def loss_fn(logits):
        return seg_loss(logits[None], case.labels) - LAMBDA_S * (logits - case.clean_logits).abs().mean()
    result = sliding_window_backward(network, case.image + case.delta, loss_fn, patch_size)
    case.delta = (case.delta - STEP * result.grad.sign()).clamp(-EPS, EPS) * case.roi
    return result.loss.item()


def nnunet_loss():
    return DC_and_CE_loss({'batch_dice': False, 'smooth': 1e-5, 'do_bg': False, 'ddp': False}, {},
                          weight_ce=1, weight_dice=1, dice_class=MemoryEfficientSoftDiceLoss)


def timed(fn, device) -> tuple:
    """Wall and process CPU seconds of fn(); the CPU time is a cross-check when other processes share the cores."""
    if device.type == 'cuda':
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.type == 'cuda':
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def measure_speed(args, device) -> dict:
    network, patch_size, predictor = build(args.patch, args.channels, device)
    seg_loss = nnunet_loss()
    warmup = Case(max(patch_size), args.channels, device).with_clean_logits(network, patch_size)  # one tile
    predictor.predict_sliding_window_return_logits(warmup.image)
    noise_update(network, patch_size, warmup, seg_loss)

    case = Case(args.size, args.channels, device).with_clean_logits(network, patch_size)
    stock, ours = [], []
    for _ in range(args.repeats):
        stock.append(timed(lambda: predictor.predict_sliding_window_return_logits(case.image), device))
        ours.append(timed(lambda: noise_update(network, patch_size, case, seg_loss), device))
    ratio_wall = min(w for w, _ in ours) / min(w for w, _ in stock)
    ratio_cpu = min(c for _, c in ours) / min(c for _, c in stock)
    ratio = ratio_wall if device.type == 'cuda' else ratio_cpu
    return {
        'patch_size': list(patch_size),
        'features_per_stage': list(planned(args.patch)[1].network_arch_init_kwargs['features_per_stage']),
        'n_tiles': n_tiles(args.size, patch_size),
        'stock_prediction_wall_s': [round(w, 3) for w, _ in stock],
        'noise_update_wall_s': [round(w, 3) for w, _ in ours],
        'stock_prediction_cpu_s': [round(c, 3) for _, c in stock],
        'noise_update_cpu_s': [round(c, 3) for _, c in ours],
        'ratio_min_wall': round(ratio_wall, 3),
        'ratio_median_wall': round(statistics.median(w for w, _ in ours) / statistics.median(w for w, _ in stock), 3),
        'ratio_min_cpu': round(ratio_cpu, 3),
        'ratio': round(ratio, 3),
        'ratio_basis': 'min wall time' if device.type == 'cuda' else 'min process CPU time',
        'target': SPEED_TARGET,
        'passed': ratio <= SPEED_TARGET,
    }


def n_tiles(edge: int, patch_size) -> int:
    steps = compute_steps_for_sliding_window([max(edge, p) for p in patch_size], patch_size, 0.5)
    return len(steps[0]) * len(steps[1]) * len(steps[2])


def proc_status_bytes(field: str) -> int:
    """VmRSS (resident now) or VmHWM (peak resident since the last reset) of this process, from Linux."""
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ':'))


def reset_peak_rss():
    """Linux >= 4.0: make VmHWM start again from the current RSS, so imports and setup do not count."""
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')


def probe_memory(args, device) -> dict:
    """Runs in its own process: peak memory of one noise update ('ours') or one stock prediction ('stock')."""
    network, patch_size, predictor = build(args.patch, args.channels, device)
    case = Case(args.probe_size, args.channels, device)
    if args.probe == 'ours':
        case.with_clean_logits(network, patch_size)
        seg_loss = nnunet_loss()
        run = lambda: noise_update(network, patch_size, case, seg_loss)  # noqa: E731
    else:
        run = lambda: predictor.predict_sliding_window_return_logits(case.image)  # noqa: E731
    if device.type == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return {'peak_bytes': torch.cuda.max_memory_allocated() - before, 'kind': 'cuda max_memory_allocated'}
    reset_peak_rss()
    before = proc_status_bytes('VmRSS')
    run()
    return {'peak_bytes': proc_status_bytes('VmHWM') - before, 'kind': 'peak RSS (VmHWM) above RSS before the call',
            'rss_before': before}


def probe_env() -> dict:
    """A fixed glibc mmap threshold (1 MiB) for the probes: tensors then go back to the OS when freed, so peak RSS
    follows live memory. With glibc's default sliding threshold, freed tile buffers stay on the heap and RSS also
    counts that retention (measured on the 2-core CPU: +150 MiB from 1 to 8 tiles, +25 MiB more from 8 to 27)."""
    return {**os.environ, 'MALLOC_MMAP_THRESHOLD_': str(2 ** 20)}


def measure_memory(args) -> dict:
    results = {}
    for method in ('ours', 'stock'):
        for size in args.mem_sizes:
            cmd = [sys.executable, __file__, '--device', args.device, '--channels', str(args.channels),
                   '--patch', str(args.patch), '--threads', str(args.threads), '--probe', method,
                   '--probe-size', str(size)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=probe_env()).stdout
            results.setdefault(method, {})[str(size)] = json.loads(out.strip().splitlines()[-1])
    small, large = (results['ours'][str(s)]['peak_bytes'] for s in args.mem_sizes)
    growth = large / small
    return {'sizes': args.mem_sizes, 'voxel_ratio': (args.mem_sizes[1] / args.mem_sizes[0]) ** 3,
            'n_tiles': [n_tiles(s, planned(args.patch)[1].patch_size) for s in args.mem_sizes], **results,
            'noise_update_growth': round(growth, 3), 'target': MEMORY_GROWTH_TARGET,
            'passed': growth < MEMORY_GROWTH_TARGET}


def machine(device) -> dict:
    cpu_model = next((line.split(':', 1)[1].strip() for line in open('/proc/cpuinfo') if line.startswith('model name')),
                     platform.processor())
    info = {'nproc': os.cpu_count(), 'cpu_model': cpu_model, 'torch_threads': torch.get_num_threads(),
            'loadavg': list(os.getloadavg())}
    if device.type == 'cuda':
        info['gpu'] = torch.cuda.get_device_name(device)
    return info


def markdown(report: dict) -> str:
    s, m = report['speed'], report['memory']
    mib = 2 ** 20
    return '\n'.join([
        f"# Speed benchmark ({report['device']}, {report['date']})",
        '',
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']}  ",
        f"torch {report['torch']}, nnunetv2 {report['nnunetv2']}",
        '',
        f"Network: nnU-Net default 3d_fullres PlainConvUNet, {report['channels']} channel(s), {N_LABELS} labels, "
        f"features {s['features_per_stage']}, patch {s['patch_size']}, tile step 0.5, no mirroring.",
        '',
        '| case | tiles | nnU-Net prediction wall / CPU (s) | one noise update wall / CPU (s) '
        '| ratio (min wall) | ratio (median wall) | ratio (min CPU) |',
        '|---|---|---|---|---|---|---|',
        f"| {report['channels']}x{report['size']}^3 | {s['n_tiles']} "
        f"| {s['stock_prediction_wall_s']} / {s['stock_prediction_cpu_s']} "
        f"| {s['noise_update_wall_s']} / {s['noise_update_cpu_s']} "
        f"| {s['ratio_min_wall']} | {s['ratio_median_wall']} | {s['ratio_min_cpu']} |",
        '',
        f"Ratio ({s['ratio_basis']}): **{s['ratio']}** (target <= {s['target']}: {'pass' if s['passed'] else 'FAIL'})",
        '',
        '| case | tiles | noise update peak (MiB) | nnU-Net prediction peak (MiB) |',
        '|---|---|---|---|',
        *[f"| {size}^3 | {tiles} | {m['ours'][str(size)]['peak_bytes'] / mib:.0f} "
          f"| {m['stock'][str(size)]['peak_bytes'] / mib:.0f} |" for size, tiles in zip(m['sizes'], m['n_tiles'])],
        '',
        f"Noise-update peak grows {m['noise_update_growth']}x for {m['voxel_ratio']:.0f}x the voxels "
        f"(target < {m['target']}: {'pass' if m['passed'] else 'FAIL'}); memory measured as "
        f"{m['ours'][str(m['sizes'][0])]['kind']}.",
        '',
    ])


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--device', choices=('cpu', 'cuda'), default='cpu')
    p.add_argument('--size', type=int, default=64, help='edge of the cubic case timed for speed')
    p.add_argument('--channels', type=int, default=1)
    p.add_argument('--patch', type=int, help='patch edge (default 48 on cpu, 128 on cuda); nnU-Net may round it')
    p.add_argument('--mem-sizes', type=int, nargs=2, help='two case edges, 2x apart (default size/2 and size)')
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--threads', type=int, default=1, help='torch CPU threads (1: CPU time measures the work)')
    p.add_argument('--out', type=Path, default=Path(__file__).parent / 'results')
    p.add_argument('--probe', choices=('ours', 'stock'), help=argparse.SUPPRESS)
    p.add_argument('--probe-size', type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.patch = args.patch or (128 if args.device == 'cuda' else 48)
    args.mem_sizes = args.mem_sizes or [args.size // 2, args.size]
    return args


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.probe:
        print(json.dumps(probe_memory(args, device)))
        return
    started = time.perf_counter()
    report = {
        'command': 'python ' + ' '.join([os.path.relpath(__file__)] + sys.argv[1:]),
        'date': datetime.datetime.now().isoformat(timespec='seconds'),
        'device': args.device, 'size': args.size, 'channels': args.channels,
        'torch': torch.__version__, 'nnunetv2': __import__('importlib.metadata').metadata.version('nnunetv2'),
        'machine': machine(device),
        'speed': measure_speed(args, device),
        'memory': measure_memory(args),
    }
    report['total_wall_s'] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"speed_{args.device}_{args.channels}x{args.size}"
    stem.with_suffix('.json').write_text(json.dumps(report, indent=2) + '\n')
    stem.with_suffix('.md').write_text(markdown(report))
    print(markdown(report))


if __name__ == '__main__':
    main()
