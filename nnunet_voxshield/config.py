"""What a protection run is asked to do: its settings, schedule, method names and defaults, in one place.

Plain dataclasses with no heavy imports, so the command line can build them before torch is loaded. The fields of
`ProtectSettings` returned by `optimisation_key` make a run's fingerprint: resuming and the report depend on them, so
a field is only ever added with a default that reproduces the old behaviour.
"""
from dataclasses import asdict, dataclass, field

METHODS = ("voxshield", "random", "classwise", "codes", "presence", "absence", "rim", "parity", "twoscale", "levels",
           "targeted", "generator")
"""voxshield: the paper's bilevel objective; random: uniform noise of the same budget and ROI;
classwise: one fixed +-eps random texture per label, shared by every case, drawn on the cropped grid;
codes: one +-eps square-wave grating per label (its own direction and period) drawn on nnU-Net's preprocessed grid;
presence: one grating for all foreground;
absence: one grating on the background inside --roi (all or dilate:N) and none on the labels: "no code" marks them;
rim: the presence grating on the labels and a second grating (another direction and period) on the background inside
--roi (all or dilate:N), so that a code marks both sides of every label edge;
parity: one +-eps period-2 code (-1)^(a.x) per label, which marks where a label ends to the voxel;
twoscale: half the budget to each label's grating (codes), half to its parity code;
levels: each label's voxels moved toward an intensity level of its own (flat, distinct levels: an intensity rule that
holds on the protected images only);
targeted: adversarial poisoning, pushing a clean-trained nnU-Net (--warm-start) toward a cyclic shift of the labels;
generator: the paper's objective, optimised through one small conv net that maps every case's label map to its delta."""
INITS = ("uniform", "codes", "presence")
"""Where the optimised methods start: uniform noise (the paper), or the `codes` / `presence` gratings."""

DEFAULT_EPS = 4 / 255
"""The paper's budget, a fraction of a +-5 sigma window (0.157 z-score units)."""
MAX_EPS = 64 / 255
"""Beyond this the "imperceptible" promise is meaningless."""
LAMBDA_Z = 0.2
"""Weight of the inter-slice frequency disruption (the paper's released default)."""
LAMBDA_S = 0.05
"""Weight of the semantic prediction disruption (the paper's released default)."""
ROI = "label"
"""Where delta may be nonzero by default: inside the ground-truth labels, as in the paper."""
MIN_SURVIVAL = 0.9
"""Per-case correlation between the perturbation nnU-Net's preprocessing sees in the written files and the optimised
one, below which protect refuses to release and check fails."""
PROBE_EVERY = 10
"""Rounds between fresh-network probes (method.probe); the last round is always probed."""
PROBE_ITERS = 250
"""Training iterations of a probe network: past nnU-Net's "predict background" phase on small datasets."""


@dataclass
class Schedule:
    """How long and how hard the two levels are optimised."""
    rounds: int = 30
    surrogate_iters: int = 10      # surrogate training batches per round (the paper's 10)
    noise_steps: int = 1           # signed-gradient steps per case per round
    step_size: float = 0.25        # step as a fraction of eps
    patches: int = 0               # patches per noise step (0: the plans' batch size)
    eot: bool = True               # optimise through random nnU-Net-like augmentations
    eot_hard: float = 0.0          # share of those draws with noise, blur and low resolution all forced on
    stop_ratio: float = 0.0        # stop once CE(x+delta)/CE(x) of the surrogate falls below this (0: never)
    reinit_every: int = 0          # rounds between re-initialisations of the surrogate (0: never)
    free_band: int = 0             # noise steps move only voxels within this many of a label boundary (0: all)


@dataclass
class ProtectSettings:
    dataset: str
    output_id: int | None = None
    configuration: str = "3d_fullres"
    plans: str = "nnUNetPlans"
    device: str = "cuda"
    method: str = "voxshield"      # one of METHODS
    eps: float | None = None       # paper unit (fraction of a +-5 sigma window); None: DEFAULT_EPS
    eps_raw: float | None = None   # absolute raw-intensity budget instead
    lambda_z: float = LAMBDA_Z
    lambda_s: float = LAMBDA_S
    roi: str = ROI
    slice_axis: int | None = None
    schedule: Schedule = field(default_factory=Schedule)
    seed: int = 0
    warm_start: str | None = None
    init: str = "uniform"          # one of INITS
    overwrite: bool = False
    resume_only: bool = False      # --continue: fail if there is nothing to resume
    num_processes: int = 2         # -np: cases prepared in parallel
    num_gpus: int = 1              # -num_gpus: processes of the bilevel loop (DDP), one GPU each on CUDA
    min_survival: float = MIN_SURVIVAL
    accept_low_survival: bool = False  # release even when a case's survival is below min_survival
    probe_every: int = PROBE_EVERY     # rounds between fresh-network probes (and after the last round); 0: none
    probe_iters: int = PROBE_ITERS     # training iterations of each fresh network

    def optimisation_key(self) -> dict:
        """The settings that define the optimised perturbations (a resumed run must match them).

        Options added later are left out at their default, so that runs from before them keep their fingerprint.
        """
        d = asdict(self)
        for k in ("dataset", "output_id", "device", "overwrite", "resume_only", "num_processes", "num_gpus",
                  "min_survival", "accept_low_survival", "probe_every", "probe_iters"):
            d.pop(k)
        if d["init"] == "uniform":
            del d["init"]
        for k in ("reinit_every", "free_band", "eot_hard"):
            if d["schedule"][k] == 0:
                del d["schedule"][k]
        return d
