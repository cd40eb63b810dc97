"""The experiments' tasks: data, model, objectives and evaluation, behind one small interface the protocol runs.

Three kinds of ticket (docs/paper_notes.md, the method):

- ``detector``: one ticket per class (or cluster of classes). Each ticket is a one-vs-rest detector trained on
  balanced batches (its positives and as many negatives drawn from the other subsets), scored by binary cross entropy
  on its own logit, as the paper trains its CIFAR tickets (App. A.2, docs/paper_notes.md choice 9: we read "binary
  classifier" as the ticket's own logit under a sigmoid).
- ``classifier``: one ticket per environment; each ticket is a full C-way classifier trained on its subset only
  (the paper's speech tickets: no negatives).
- ``inr``: one ticket per image region; each ticket fits the pixels of its region (the paper's INR).

Every method is evaluated through a ``routed_fn(x, route) -> outputs``: the routed model, or K independent
models dispatched by route, or a single model that ignores the route.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import metrics as rtl_metrics
from .. import routers

RoutedFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class Settings:
    """Training budget of one experiment (the quick, full and paper presets differ only here).

    Every method's retraining gets the same budget, RTL's joint retraining (Alg. 2): ``retrain_epochs`` epochs of
    the longest subset's batches times the tickets with data, in optimizer steps of ``batch_size`` samples. The
    dense baseline and the single-mask model take those steps over the whole training set; the independent models
    share them (docs/paper_notes.md, the budget rule).

    Attributes:
        batch_size: samples per step.
        lr: Adam learning rate for every method.
        single_epochs: epochs of the single-mask IMP model per pruning round (Alg. 1 with one mask).
        ticket_steps: Alg. 1's T: steps on one subset before each pruning of its ticket (when ticket_epochs is 0).
        ticket_epochs: Alg. 1's training per round in epochs of the ticket's subset (the paper's 10); 0: use
            ticket_steps.
        retrain_epochs: Alg. 2's N: epochs of joint retraining, which set every method's retraining budget.
        prune_fraction: fraction of each ticket's remaining prunable weights removed per round (when prune_count
            is 0).
        prune_count: weights removed per round and ticket (the paper's 4,096); 0: use prune_fraction.
        eval_batch: batch size of evaluation and timing.
        lr_schedule: "cosine" (decay to 0 over each training call) or "constant".
        granularity: the masks' structure: "unstructured", "vector:V" (runs of V weights along a row),
            "block:BNxBK" or "channel" (see :func:`rtl.prune.magnitude_prune_`); structured masks trade accuracy
            for kernel speed.
    """

    batch_size: int = 64
    lr: float = 2e-3
    single_epochs: int = 4
    ticket_steps: int = 40
    ticket_epochs: int = 0
    retrain_epochs: int = 6
    prune_fraction: float = 0.3
    prune_count: int = 0
    eval_batch: int = 512
    lr_schedule: str = "cosine"
    granularity: str = "unstructured"


def parse_granularity(text: str):
    """ "unstructured" | "channel" | "vector:V" | "block:BNxBK" -> the granularity rtl.prune takes."""
    kind, _, arg = text.partition(":")
    try:
        if kind in ("unstructured", "channel") and not arg:
            return kind
        if kind == "vector":
            return ("vector", int(arg))
        if kind == "block":
            bn, bk = arg.split("x")
            return ("block", int(bn), int(bk))
    except ValueError:
        pass
    raise ValueError(f"granularity must be unstructured, channel, vector:V or block:BNxBK, got {text!r}")


def _detector_summary(detect: Dict) -> Dict:
    """The entries of :func:`rtl.metrics.detector_metrics` a run keeps (macro means and the per-ticket values)."""
    return {k: detect[k] for k in ("balanced_accuracy", "precision", "recall", "per_ticket")}


def _batches(index: Tensor, batch_size: int, gen: torch.Generator) -> Iterator[Tensor]:
    """One epoch of ``index`` in a random order, ceil(n / batch_size) batches, all full: the last is topped up with
    the epoch's first items (a subset smaller than a batch repeats its items), so that every step of every method
    presents batch_size samples (the budget rule)."""
    order = index[torch.randperm(index.numel(), generator=gen)]
    for start in range(0, order.numel(), batch_size):
        chunk = order[start : start + batch_size]
        if chunk.numel() < batch_size:
            chunk = order.repeat(-(-batch_size // order.numel()) + 1)[start : start + batch_size]
        yield chunk


class Task:
    """Base of every experiment's task. Subclasses fill the attributes and the objective.

    Attributes:
        name, description: for listings and reports.
        kind: "detector", "classifier" or "inr".
        num_tickets: T; ticket_names: one name per ticket.
        x_train, y_train, t_train: inputs (N, ...), targets (N, ...), tickets (N,) int64 of the training set.
        x_test, y_test, t_test: the same for the test set.
        settings: quick or full :class:`Settings`.
    """

    name = "task"
    description = ""
    kind = "classifier"
    num_tickets: int
    ticket_names: List[str]
    num_classes: int = 0
    settings: Settings
    x_train: Tensor
    y_train: Tensor
    t_train: Tensor
    x_test: Tensor
    y_test: Tensor
    t_test: Tensor

    # -- model -------------------------------------------------------------------------------------------------
    def build_model(self, seed: int) -> nn.Module:
        raise NotImplementedError

    def prunable_filter(self, name: str, module: nn.Module) -> bool:
        raise NotImplementedError

    def forward(self, model: Callable, x: Tensor) -> Tensor:
        """The model's output for inputs x (the INR adds its conditioning here)."""
        return model(x)

    # -- data for the three training regimes ----------------------------------------------------------------------
    def all_batches(self, gen: torch.Generator) -> Iterator[Tuple[Tensor, Tensor]]:
        """One epoch over the whole training set: (x, y) for the single and dense models."""
        for idx in _batches(torch.arange(self.x_train.shape[0]), self.settings.batch_size, gen):
            yield self.x_train[idx], self.y_train[idx]

    def ticket_batches(self, ticket: int, gen: torch.Generator) -> Iterator[Tuple[Tensor, Tensor]]:
        """One epoch over ticket ``ticket``'s subset: (x, target) for that ticket's objective."""
        own = (self.t_train == ticket).nonzero().flatten()
        for idx in _batches(own, self.settings.batch_size, gen):
            yield self.x_train[idx], self.y_train[idx]

    def subset_size(self, ticket: int) -> int:
        return int((self.t_train == ticket).sum())

    def batch_count(self) -> int:
        """The number of batches :meth:`all_batches` yields in one epoch."""
        return -(-self.x_train.shape[0] // self.settings.batch_size)

    def ticket_batch_count(self, ticket: int) -> int:
        """The number of batches :meth:`ticket_batches` yields in one epoch (0 for an empty subset)."""
        return -(-self.subset_size(ticket) // self.settings.batch_size)

    # -- objectives ----------------------------------------------------------------------------------------------
    def loss_all(self, out: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(out, y)

    def loss_ticket(self, out: Tensor, target: Tensor, ticket: int) -> Tensor:
        return F.cross_entropy(out, target)

    # -- evaluation ----------------------------------------------------------------------------------------------
    def evaluate_single(self, fn: Callable[[Tensor], Tensor]) -> Dict:
        """Metrics of a model that takes no route (dense, single-mask IMP)."""
        raise NotImplementedError

    def evaluate_routed(self, routed_fn: RoutedFn) -> Dict:
        """Metrics of a routed method (RTL, independent models): oracle and, where defined, label-free routing."""
        raise NotImplementedError

    def to(self, device) -> "Task":
        """Move the task's tensors to ``device`` (the models follow in the protocol)."""
        for name in ("x_train", "y_train", "t_train", "x_test", "y_test", "t_test"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def timing_batch(self) -> Tuple[Tensor, Tensor]:
        """(x, route) of a mixed-ticket inference batch for the speed comparison."""
        n = min(self.settings.eval_batch, self.x_test.shape[0])
        return self.x_test[:n], self.t_test[:n]


def predict(fn: Callable[[Tensor], Tensor], x: Tensor, batch: int) -> Tensor:
    """fn over x in batches, without gradients. x (N, ...) -> (N, ...)."""
    with torch.no_grad():
        return torch.cat([fn(x[i : i + batch]) for i in range(0, x.shape[0], batch)])


def predict_routed(routed_fn: RoutedFn, x: Tensor, route: Tensor, batch: int) -> Tensor:
    with torch.no_grad():
        return torch.cat([routed_fn(x[i : i + batch], route[i : i + batch]) for i in range(0, x.shape[0], batch)])


def classification_metrics(y_true: Tensor, y_pred: Tensor, num_classes: int) -> Dict[str, float]:
    """Macro one-vs-rest balanced accuracy, precision and recall (the paper's Table 1 metrics), and accuracy."""
    labels = list(range(num_classes))
    return {
        "balanced_accuracy": rtl_metrics.balanced_accuracy(y_true, y_pred, labels=labels),
        "precision": rtl_metrics.macro_precision(y_true, y_pred, labels=labels),
        "recall": rtl_metrics.macro_recall(y_true, y_pred, labels=labels),
        "accuracy": float((y_true == y_pred).double().mean()),
    }


# -- digits-classes: one detector ticket per class --------------------------------------------------------------


class DigitsClasses(Task):
    """scikit-learn's digits, one ticket per class; each ticket a one-vs-rest detector (the paper's CIFAR-10 set-up)."""

    name = "digits-classes"
    description = "scikit-learn digits (8x8), one ticket per class (10 one-vs-rest detectors), small CNN"
    kind = "detector"

    def __init__(self, settings: Settings, seed: int = 0) -> None:
        from ..data.digits import load_digits_split

        split = load_digits_split(seed=seed)
        self.settings = settings
        self.x_train, self.y_train = split.x_train, split.y_train
        self.x_test, self.y_test = split.x_test, split.y_test
        self.num_classes = 10
        self.num_tickets = 10
        self.ticket_names = [str(c) for c in range(10)]
        self.label_router = routers.LabelRouter.identity(10)
        self.t_train = self.label_router(self.y_train)
        self.t_test = self.label_router(self.y_test)

    def build_model(self, seed: int) -> nn.Module:
        from ..models import SmallCNN

        torch.manual_seed(seed)
        return SmallCNN(num_classes=self.num_classes, in_channels=1)

    def prunable_filter(self, name, module):
        from ..models import SmallCNN

        return SmallCNN.prunable_filter(None, name, module)

    def ticket_batches(self, ticket, gen):
        # balanced one-vs-rest batches: each batch holds half positives of the ticket, half negatives drawn
        # uniformly from the other subsets (fresh every epoch)
        pos = (self.t_train == ticket).nonzero().flatten()
        neg = (self.t_train != ticket).nonzero().flatten()
        half = max(1, self.settings.batch_size // 2)
        for p in _batches(pos, half, gen):
            n = neg[torch.randint(0, neg.numel(), (p.numel(),), generator=gen)]
            idx = torch.cat([p, n])
            target = torch.cat([torch.ones(p.numel()), torch.zeros(n.numel())])
            yield self.x_train[idx], target

    def ticket_batch_count(self, ticket):
        return -(-self.subset_size(ticket) // max(1, self.settings.batch_size // 2))

    def loss_ticket(self, out, target, ticket):
        return F.binary_cross_entropy_with_logits(out[:, ticket], target)

    def evaluate_single(self, fn):
        """The single C-way model scored both ways: as a C-way classifier (argmax), and under the tickets' own
        protocol, one-vs-rest detectors: ticket t's score is the probability the model gives t's subset (its class,
        or the sum over a cluster's classes), thresholded at 0.5 as the tickets' sigmoid scores are."""
        logits = predict(fn, self.x_test, self.settings.eval_batch)
        probs = logits.softmax(1)
        classes = getattr(self, "ticket_classes", None)
        ticket_probs = probs if classes is None else torch.stack([probs[:, c].sum(1) for c in classes], dim=1)
        detect = rtl_metrics.detector_metrics(ticket_probs, self.t_test)
        return {
            "multiclass": classification_metrics(self.y_test, logits.argmax(1), self.num_classes),
            "detectors": _detector_summary(detect),
        }

    def evaluate_routed(self, routed_fn):
        batch = self.settings.eval_batch
        scores = torch.stack(
            [
                predict_routed(routed_fn, self.x_test, torch.full_like(self.t_test, t), batch)[:, t]
                for t in range(self.num_tickets)
            ],
            dim=1,
        )  # (N, T): ticket t's own logit on every test image
        detect = rtl_metrics.detector_metrics(torch.sigmoid(scores), self.y_test)
        own = scores.argmax(1)  # label-free: every ticket scores every image, the most confident detector wins
        return {
            "detectors": _detector_summary(detect),
            "all_tickets": classification_metrics(self.y_test, own, self.num_classes),
        }


# -- digits-environments: one classifier ticket per corruption --------------------------------------------------


def environment_features(x: Tensor) -> Tensor:
    """Label-free statistics that tell the corruptions apart. x (N, 1, 8, 8) -> (N, 5).

    Mean, standard deviation, mean absolute Laplacian (noise raises it, blur lowers it), and the fractions of
    near-black and near-white pixels (occlusion patches and clipped noise).
    """
    flat = x.flatten(1)
    lap = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], dtype=x.dtype, device=x.device)
    lap = lap.view(1, 1, 3, 3)
    high = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), lap).abs().flatten(1).mean(1)
    return torch.stack(
        [flat.mean(1), flat.std(1), high, (flat < 0.02).float().mean(1), (flat > 0.98).float().mean(1)], dim=1
    )


class DigitsEnvironments(Task):
    """Digits under three corruption environments (noise, blur, occlusion), one classifier ticket per environment."""

    name = "digits-environments"
    description = (
        "scikit-learn digits under 3 deterministic corruptions (noise, blur, occlusion), one ticket per "
        "environment (10-way classifiers), small CNN"
    )
    kind = "classifier"

    def __init__(self, settings: Settings, seed: int = 0) -> None:
        from ..data.digits import load_digits_split, make_environment_split

        split = make_environment_split(load_digits_split(seed=seed), seed=seed)
        self.settings = settings
        self.x_train, self.y_train, self.x_test, self.y_test = split.x_train, split.y_train, split.x_test, split.y_test
        self.num_classes = 10
        self.num_tickets = len(split.environments)
        self.ticket_names = list(split.environments)
        self.env_router = routers.EnvironmentRouter(list(split.environments))
        self.t_train = self.env_router(split.env_train)
        self.t_test = self.env_router(split.env_test)
        # label-free routing: nearest centroid of each environment's training statistics (standardised)
        feats = environment_features(self.x_train)
        self._mu, self._sd = feats.mean(0), feats.std(0).clamp_min(1e-6)
        self.cluster_router = routers.ClusterRouter.from_partition(
            (feats - self._mu) / self._sd,
            self.t_train,
            [[t] for t in range(self.num_tickets)],
            feature_fn=lambda x: (environment_features(x) - self._mu) / self._sd,
        )

    build_model = DigitsClasses.build_model
    prunable_filter = DigitsClasses.prunable_filter

    def evaluate_single(self, fn):
        logits = predict(fn, self.x_test, self.settings.eval_batch)
        return {"multiclass": classification_metrics(self.y_test, logits.argmax(1), self.num_classes)}

    def evaluate_routed(self, routed_fn):
        batch = self.settings.eval_batch
        oracle = predict_routed(routed_fn, self.x_test, self.t_test, batch).argmax(1)
        routed = self.cluster_router(self.x_test)
        cluster = predict_routed(routed_fn, self.x_test, routed, batch).argmax(1)
        probs = torch.stack(
            [
                predict_routed(routed_fn, self.x_test, torch.full_like(self.t_test, t), batch).softmax(1)
                for t in range(self.num_tickets)
            ],
            dim=1,
        )  # (N, T, C)
        best = probs.amax(2).argmax(1)  # the most confident ticket decides
        all_pred = probs[torch.arange(probs.shape[0]), best].argmax(1)
        per_ticket = [
            float((oracle[self.t_test == t] == self.y_test[self.t_test == t]).double().mean())
            for t in range(self.num_tickets)
        ]
        return {
            "oracle": dict(
                classification_metrics(self.y_test, oracle, self.num_classes), per_ticket_accuracy=per_ticket
            ),
            "cluster": dict(
                classification_metrics(self.y_test, cluster, self.num_classes),
                routing_accuracy=float((routed == self.t_test).double().mean()),
            ),
            "all_tickets": classification_metrics(self.y_test, all_pred, self.num_classes),
        }


# -- inr-regions: one ticket per region of a bundled image -------------------------------------------------------


class _ConditionedINR(nn.Module):
    """The paper's single-model INR baseline: Fourier features plus a learned 16-dim region embedding."""

    def __init__(self, num_regions: int, embed: int = 16) -> None:
        super().__init__()
        from ..models import FourierINR

        self.embedding = nn.Embedding(num_regions, embed)
        self.inr = FourierINR(cond_features=embed)

    def forward(self, xr: Tensor) -> Tensor:
        return self.inr(xr[:, :2], self.embedding(xr[:, 2].long()))


class INRRegions(Task):
    """An implicit neural representation of a bundled image (``image``, one of
    :data:`rtl.data.inr_image.INR_IMAGES`, resized to ``size`` x ``size``), one ticket per segmented region (the
    paper's INR).

    Inputs are rows (coordinate x, coordinate y, region id); the routed models read the coordinates and take the
    region as their route, the single-mask baseline reads the region through a learned embedding (paper 3.1).
    """

    name = "inr-regions"
    description = (
        "INR (Fourier features + 5-layer MLP 34-128-128-128-128-3) of scikit-image's astronaut, one ticket "
        "per colour/position region; PSNR"
    )
    kind = "inr"

    def __init__(
        self, settings: Settings, seed: int = 0, size: int = 48, num_regions: int = 6, image: str = "astronaut"
    ) -> None:
        from ..data.inr_image import load_inr_image

        img = load_inr_image(image, size=size, num_regions=num_regions, seed=seed)
        self.settings = settings
        self.image = image
        self.image_shape = tuple(img.image.shape)  # (H, W, 3)
        # the class's description names the default image; a run's names its own, with its size
        self.description = self.description.replace("astronaut", f"{image} ({img.shape[0]}x{img.shape[1]})")
        rows = torch.cat([img.coords, img.regions.unsqueeze(1).to(img.coords.dtype)], dim=1)
        # every pixel is both train and test: an INR fits one signal (PSNR on the fitted image, as the paper)
        self.x_train = self.x_test = rows
        self.y_train = self.y_test = img.pixels
        self.t_train = self.t_test = img.regions
        self.num_tickets = int(img.regions.max()) + 1
        self.ticket_names = list(img.region_names)

    def build_model(self, seed: int) -> nn.Module:
        from ..models import FourierINR

        torch.manual_seed(seed)
        return FourierINR()

    def build_single_model(self, seed: int) -> nn.Module:
        # paper 3.1 fair init: the baseline's init minus its embedding columns is the RTL init
        routed_init = self.build_model(seed)
        model = _ConditionedINR(self.num_tickets)
        with torch.no_grad():
            for src, dst in zip(routed_init.layers, model.inr.layers):
                if src.weight.shape == dst.weight.shape:
                    dst.weight.copy_(src.weight)
                else:
                    dst.weight[:, : src.weight.shape[1]].copy_(src.weight)
                dst.bias.copy_(src.bias)
        return model

    def prunable_filter(self, name, module):
        return isinstance(module, nn.Linear) and not isinstance(module, nn.Embedding)

    def forward(self, model, x):
        if isinstance(model, _ConditionedINR):  # the baseline reads the region through its embedding
            return model(x)
        return model(x[:, :2])

    def loss_all(self, out, y):
        return F.mse_loss(out, y)

    def loss_ticket(self, out, target, ticket):
        return F.mse_loss(out, target)

    def _psnr(self, pred: Tensor) -> Dict[str, float]:
        per_region = [
            rtl_metrics.psnr(pred[self.t_test == t], self.y_test[self.t_test == t]) for t in range(self.num_tickets)
        ]
        return {"psnr": rtl_metrics.psnr(pred, self.y_test), "psnr_per_region": per_region}

    def evaluate_single(self, fn):
        return {"image": self._psnr(predict(fn, self.x_test, self.settings.eval_batch))}

    def evaluate_routed(self, routed_fn):
        return {"image": self._psnr(predict_routed(routed_fn, self.x_test, self.t_test, self.settings.eval_batch))}


# -- CIFAR (the paper's own data, when the user has it) ------------------------------------------------------------


class CifarTickets(DigitsClasses):
    """CIFAR-10 with one detector ticket per class, or CIFAR-100 with the paper's 8 text clusters (Table 5)."""

    kind = "detector"

    def __init__(
        self,
        settings: Settings,
        seed: int = 0,
        dataset: str = "cifar10",
        data_root: Optional[str] = None,
        download: bool = False,
        limit: Optional[int] = None,
    ) -> None:
        from ..data.cifar import cifar100_cluster_partition, load_cifar

        if data_root is None:
            raise ValueError(
                f"{dataset} needs its data on disk: pass --data-root DIR holding "
                f"{'cifar-10-batches-py' if dataset == 'cifar10' else 'cifar-100-python'} (from "
                f"https://www.cs.toronto.edu/~kriz/cifar.html), or add --download to fetch it there"
            )
        self.settings = settings
        train = load_cifar(dataset, data_root, download=download, train=True)
        test = load_cifar(dataset, data_root, download=download, train=False)
        self.x_train, self.y_train = train[0][:limit], train[1][:limit]
        self.x_test, self.y_test = test[0][:limit], test[1][:limit]
        self.num_classes = 10 if dataset == "cifar10" else 100
        if dataset == "cifar10":
            self.label_router = routers.LabelRouter.identity(10)
            self.ticket_names = [str(c) for c in range(10)]
            self.ticket_classes = None
        else:
            partition = cifar100_cluster_partition(train[2]) if len(train) > 2 else cifar100_cluster_partition()
            self.label_router = routers.LabelRouter(partition)
            self.ticket_names = [f"cluster {k + 1}" for k in range(len(partition))]
            self.ticket_classes = partition
        self.num_tickets = len(self.ticket_names)
        self.t_train = self.label_router(self.y_train)
        self.t_test = self.label_router(self.y_test)
        self.name = f"{dataset}-{'classes' if dataset == 'cifar10' else 'clusters'}"

    def build_model(self, seed):
        from ..models import GhostNet

        torch.manual_seed(seed)
        return GhostNet(num_classes=self.num_classes)

    def prunable_filter(self, name, module):
        from ..models import GhostNet

        return GhostNet.prunable_filter(None, name, module)

    def loss_ticket(self, out, target, ticket):
        if self.ticket_classes is None:
            return super().loss_ticket(out, target, ticket)
        # a cluster ticket detects "any class of my cluster": its score is the logsumexp of its classes' logits
        score = out[:, self.ticket_classes[ticket]].logsumexp(1)
        return F.binary_cross_entropy_with_logits(score, target)

    def evaluate_routed(self, routed_fn):
        if self.ticket_classes is None:
            return super().evaluate_routed(routed_fn)
        batch = self.settings.eval_batch
        scores = torch.stack(
            [
                predict_routed(routed_fn, self.x_test, torch.full_like(self.t_test, t), batch)[:, cls].logsumexp(1)
                for t, cls in enumerate(self.ticket_classes)
            ],
            dim=1,
        )
        detect = rtl_metrics.detector_metrics(torch.sigmoid(scores), self.t_test)
        return {"detectors": _detector_summary(detect)}
