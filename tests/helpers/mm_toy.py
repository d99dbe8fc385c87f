"""A toy mmengine model and dataset for DyRepHook tests that need a real Runner but not a detector: a small
conv classifier (``backbone`` + linear ``head``) on synthetic images whose class is the bright quadrant.

Registering them (:func:`register_toy`) puts ``ToyClassifier`` in mmengine's ``MODELS``, ``ToyQuadrants``
in its ``DATASETS`` and ``ToyAccuracy`` in its ``METRICS``, so :func:`toy_cfg` is an ordinary config that ``Runner.from_cfg`` builds, as a user's
config would be; runs take seconds on a CPU, which leaves room for ``torch.compile`` and two ranks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from mmengine.evaluator import BaseMetric
from mmengine.hooks import Hook
from mmengine.model import BaseModel
from mmengine.registry import DATASETS, METRICS, MODELS
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from .hook_entry import set_hook_options

#: Images of TOY_SIZE x TOY_SIZE, one class per quadrant.
TOY_SIZE, TOY_CLASSES = 16, 4


class ToyClassifier(BaseModel):
    """Two 3x3 conv + BN + ReLU stages (the DyRep target ``backbone``), pooled, then a linear ``head``."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(width, TOY_CLASSES)

    def forward(self, inputs: torch.Tensor, data_samples: torch.Tensor | None = None, mode: str = "tensor"):
        logits = self.head(self.backbone(inputs))
        if mode == "loss":
            return {"loss": F.cross_entropy(logits, data_samples)}
        if mode == "predict":
            return [{"pred": p, "label": t} for p, t in zip(logits.argmax(1), data_samples)]
        return logits


class ToyQuadrants(Dataset):
    """``length`` noisy images (seeded by ``seed``) whose label is the quadrant brightened by one."""

    def __init__(self, length: int = 32, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        half = TOY_SIZE // 2
        self.items = []
        for i in range(length):
            label = i % TOY_CLASSES
            image = torch.randn(3, TOY_SIZE, TOY_SIZE, generator=g) * 0.5
            row, col = divmod(label, 2)
            image[:, row * half:(row + 1) * half, col * half:(col + 1) * half] += 1.0
            self.items.append({"inputs": image, "data_samples": label})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


class ToyAccuracy(BaseMetric):
    """Accuracy of :class:`ToyClassifier`'s predictions (for configs with a validation loop)."""

    def process(self, data_batch: Any, data_samples: Any) -> None:
        self.results.extend(int(s["pred"]) == int(s["label"]) for s in data_samples)

    def compute_metrics(self, results: list) -> dict[str, float]:
        return {"accuracy": sum(results) / len(results)}


def toy_val_entries() -> dict[str, Any]:
    """The config entries of a validation loop on 16 more toy images (``toy_cfg(..., **toy_val_entries())``)."""
    return dict(val_dataloader=dict(dataset=dict(type="ToyQuadrants", length=16, seed=1), batch_size=4, num_workers=0,
                                    sampler=dict(type="DefaultSampler", shuffle=False),
                                    collate_fn=dict(type="default_collate")),
                val_cfg=dict(), val_evaluator=dict(type="ToyAccuracy"))


def register_toy() -> None:
    """Put the toy model and dataset in mmengine's registries, and DyRepHook (idempotent).

    ``custom_imports`` is read by ``Config.fromfile`` only, not by a config built in code.
    """
    import dyrep_fx.mm  # noqa: F401  registers DyRepHook
    MODELS.register_module(module=ToyClassifier, force=True)
    DATASETS.register_module(module=ToyQuadrants, force=True)
    METRICS.register_module(module=ToyAccuracy, force=True)


def toy_cfg(work_dir: Path, iters: int, interval: int, hook_options: dict | None = None, **entries: Any) -> Any:
    """A config training :class:`ToyClassifier` for ``iters`` iterations (batch 4 of 32 images, 8 per epoch),
    SGD, no validation, with a DyRepHook on ``backbone`` stepping every ``interval`` iterations
    (``hook_options`` on top), quiet, one checkpoint at the end; ``entries`` replace whole top-level
    entries (``compile``, ``launcher``, ``train_cfg``, ``custom_hooks``...)."""
    from mmengine.config import Config

    register_toy()
    hook = set_hook_options(dict(type="DyRepHook", targets=["backbone"], deploy=False,
                                 dyrep=dict(interval=interval, calib_batches=2)), **(hook_options or {}))
    cfg = dict(
        model=dict(type="ToyClassifier"),
        work_dir=str(work_dir),
        experiment_name=f"toy_{work_dir.name}_{id(work_dir):x}",  # a fresh MessageHub / logger per run
        train_dataloader=dict(
            dataset=dict(type="ToyQuadrants", length=32), batch_size=4, num_workers=0,
            sampler=dict(type="DefaultSampler", shuffle=True), collate_fn=dict(type="default_collate")),
        train_cfg=dict(by_epoch=False, max_iters=iters, val_interval=iters + 1),
        # no paramwise_cfg: mmengine 0.10.7 then builds its groups as ConfigDicts, which torch.compile's
        # tracing of optimizer.step cannot handle ("'UserDefinedDictVariable' object has no attribute 'items'")
        optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.05, momentum=0.9, weight_decay=1e-4)),
        default_hooks=dict(checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=iters),
                           logger=dict(type="LoggerHook", interval=1)),
        custom_hooks=[hook],
        randomness=dict(seed=0),
        launcher="none",
        log_level="WARNING",
        env_cfg=dict(dist_cfg=dict(backend="gloo")),
    )
    cfg.update(entries)
    return Config(cfg)


def train_toy(cfg: Any, *hooks: tuple[Any, str | int]) -> Any:
    """Build mmengine's Runner from ``cfg`` (see :func:`toy_cfg`), register the ``(hook, priority)`` pairs,
    train; the runner."""
    from mmengine.runner import Runner

    runner = Runner.from_cfg(cfg)
    for hook, priority in hooks:
        runner.register_hook(hook, priority)
    runner.train()
    return runner


# -- torch.compile -------------------------------------------------------------------------------------------
GRAPH_LOG_BACKEND = "dyrep_graph_log"


class GraphLog:
    """A torch.compile backend that records each graph it is handed and runs it as captured.

    Registered as :data:`GRAPH_LOG_BACKEND` (``compile=dict(backend="dyrep_graph_log")`` in a config). Per
    graph: ``iter``, the runner's iteration at the time (set by :class:`CompileProbe`), and ``inputs``, the
    names of its placeholders, which name the parameters of the module the graph runs (torch.compile lifts
    the parameters of inlined modules to graph inputs): a graph of a grown model has its branches there.
    """

    def __init__(self) -> None:
        self.graphs: list[dict[str, Any]] = []
        self.iteration = -1

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Any:
        names = [str(n.target) for n in gm.graph.nodes if n.op in ("placeholder", "get_attr")]
        self.graphs.append({"iter": self.iteration, "inputs": names})
        return gm.forward


GRAPH_LOG = GraphLog()


def register_graph_log() -> GraphLog:
    """Register :data:`GRAPH_LOG` with torch.compile under :data:`GRAPH_LOG_BACKEND`, emptied; return it."""
    from torch._dynamo import list_backends, register_backend

    if GRAPH_LOG_BACKEND not in list_backends(exclude_tags=()):
        register_backend(GRAPH_LOG, name=GRAPH_LOG_BACKEND)
    GRAPH_LOG.graphs.clear()
    GRAPH_LOG.iteration = -1
    return GRAPH_LOG


def compiled_train_step_of(model: nn.Module) -> bool:
    """Whether ``model.train_step`` is the one mmengine's ``compile`` put there: a torch.compile'd function on
    the instance, of ``train_step`` bound to this very ``model`` (not to a wrapper it replaced)."""
    step = vars(model).get("train_step")
    original = getattr(step, "_torchdynamo_orig_callable", None)
    return original is not None and getattr(original, "__self__", None) is model


def graphs_compiled() -> int:
    """How many graphs torch.compile has compiled in this process (since the last ``torch._dynamo.reset``)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


class CompileProbe(Hook):
    """Records, per training iteration, the wrapper in use (``wrappers``: its id, class name and whether its
    ``train_step`` is compiled for it), the loss and the graphs compiled so far (``graphs``, cumulative), and
    tells ``graph_log`` (a :class:`GraphLog`, or None) the iteration. Register it at ``"HIGH"``: before
    DyRepHook (``"ABOVE_NORMAL"``) in each event, so an iteration's entries precede the step after it."""

    def __init__(self, record: dict[str, list], graph_log: GraphLog | None) -> None:
        self.record, self.graph_log = record, graph_log

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        if self.graph_log is not None:
            self.graph_log.iteration = runner.iter
        model = runner.model
        self.record["wrappers"].append((id(model), type(model).__name__, compiled_train_step_of(model)))

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        self.record["losses"].append(float(outputs["loss"].detach()))
        self.record["graphs"].append(graphs_compiled())


def compile_probe(graph_log: GraphLog | None = None) -> tuple[dict[str, list], tuple[Any, str]]:
    """A record and a :class:`CompileProbe` hook with its priority, for :func:`train_toy`."""
    record: dict[str, list] = {"wrappers": [], "losses": [], "graphs": []}
    return record, (CompileProbe(record, graph_log), "HIGH")
