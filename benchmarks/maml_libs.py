"""One meta-gradient of MAML and its family, written idiomatically with each library.

Every entry maps ``(model, loss_fn, lr, steps, first_order)`` to a function of a task batch
``(support_x, support_y, query_x, query_y)`` (leading task dimension) that computes the mean
query loss over tasks after ``steps`` inner steps and leaves the meta-gradient in ``model``'s
``.grad`` fields. The algorithms (:data:`ALGORITHMS`):

* ``maml``: inner SGD of size ``lr`` on every parameter;
* ``metasgd``: Meta-SGD, ``theta - alpha * grad`` with a learned rate tensor ``alpha`` of each
  parameter's shape, starting at ``lr``. The step owns the rates and exposes them as
  ``step.rates`` (in the model's parameter order); their meta-gradient is in their ``.grad``;
* ``anil``: only the head (:func:`head_name`) adapts, by SGD; the body is meta-learned
  through the features;
* ``maml-adam``: inner Adam (torch.optim's formula, betas (0.9, 0.999), eps 1e-8, state
  zero per task) of step size ``lr`` on every parameter;
* ``imaml``: iMAML, ``steps`` plain gradient steps of size ``lr`` on the proximal objective
  ``L_support(phi) + LAM/2 |phi - theta|^2`` from ``phi = theta`` (no graph through them),
  then the implicit meta-gradient ``mean_t LAM (H_t + LAM I)^-1 grad L_query(phi_t)`` by
  :data:`CG_STEPS` conjugate-gradient iterations from 0, stopping early when ``r.r <``
  :data:`CG_TOL` for the system scaled as metagrad's (right-hand side ``LAM * grad``).
  No first-order variant.

A factory that cannot express an algorithm raises ``NotImplementedError`` saying why (the
benchmark reports it as n/a). Peers are imported lazily: a missing peer is reported by
:func:`missing`, never an import error.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

Batch = tuple[Tensor, Tensor, Tensor, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]
Step = Callable[[Batch], Tensor]
Factory = Callable[[nn.Module, LossFn, float, int, bool], Step]

ALGORITHMS = {
    "maml": "MAML",
    "metasgd": "Meta-SGD",
    "anil": "ANIL",
    "maml-adam": "MAML with inner Adam",
    "imaml": "iMAML",
}
B1, B2, EPS = 0.9, 0.999, 1e-8  # inner Adam, every library's default
# iMAML: the authors' Omniglot proximal strength and CG iterations (metagrad's defaults);
# CG_TOL: metagrad.core.linalg.conjugate_gradient's early stop, r.r < 1e-10
LAM, CG_STEPS, CG_TOL = 2.0, 5, 1e-10


# ---------------------------------------------------------------- model helpers
def head_name(model: nn.Module) -> str:
    """The ANIL head of the benchmark's models: Conv4's ``head``, the MLP's last layer."""
    if isinstance(getattr(model, "head", None), nn.Linear):
        return "head"
    net = getattr(model, "net", None)
    if isinstance(net, nn.Sequential) and isinstance(net[-1], nn.Linear):
        return f"net.{len(net) - 1}"
    raise NotImplementedError(f"no known head for {type(model).__name__}")


def body_and_head(model: nn.Module) -> tuple[Callable[[Tensor], Tensor], nn.Module]:
    """``(body, head)`` with ``model(x) == head(body(x))``, for the peers' ANIL idiom: the
    features are computed once per task and only the head runs in the inner loop."""
    name = head_name(model)
    head = model.get_submodule(name)
    if name == "head":  # metagrad.models.Conv4

        def body(x: Tensor) -> Tensor:
            h = model.features(x)
            return h.mean((-2, -1)) if model.spatial_mean else h.flatten(1)

        return body, head
    return model.net[:-1], head  # metagrad.models.MLP


def adapted_names(model: nn.Module, algorithm: str) -> list[str]:
    """The parameters the inner loop updates, in model order."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if algorithm == "anil":
        head = head_name(model)
        return [n for n in names if n.startswith(head + ".")]
    return names


def meta_parameters(model: nn.Module, step: Step) -> list[Tensor]:
    """What the outer optimizer updates: the model's parameters, then any learned rates."""
    return [*model.parameters(), *getattr(step, "rates", [])]


class WithRates:
    """A step and the learned inner rates it owns (``rates``: one per adapted parameter)."""

    def __init__(self, step: Step, rates: Sequence[Tensor]) -> None:
        self.step, self.rates = step, list(rates)

    def __call__(self, batch: Batch) -> Tensor:
        return self.step(batch)


def _new_rates(params: Sequence[Tensor], lr: float) -> list[Tensor]:
    return [torch.full_like(p, lr).requires_grad_() for p in params]


# ---------------------------------------------------------------- metagrad
class Metagrad:
    """metagrad's ``meta_backward`` with its default strategy (kept, so its verdict can be
    read); ``compile=True`` for the compiled variant, ``algorithm`` picks the learner."""

    compile = False
    algorithm = "maml"

    def __init__(self, model: nn.Module, loss_fn: LossFn, lr: float, steps: int, fo: bool):
        import metagrad as mg

        kw = {"inner_lr": lr, "inner_steps": steps, "first_order": fo, "compile": self.compile}
        if self.algorithm == "imaml":
            _implicit_only(fo)
            self.maml: mg.MAML = mg.iMAML(model, loss_fn, lr, steps, lam=LAM, cg_steps=CG_STEPS)
        elif self.algorithm == "metasgd":
            self.maml = mg.MetaSGD(model, loss_fn, **kw)
        elif self.algorithm == "anil":
            self.maml = mg.ANIL(model, loss_fn, head=head_name(model), **kw)
        elif self.algorithm == "maml-adam":
            self.maml = mg.MAML(model, loss_fn, inner_optimizer=mg.inner.Adam((B1, B2), EPS), **kw)
        else:
            self.maml = mg.MAML(model, loss_fn, **kw)
        lrs = self.maml.learned_lrs()  # by name (Meta-SGD only); listed in the model's order
        self.rates = [lrs[n] for n, _ in model.named_parameters() if n in lrs]

    def __call__(self, batch: Batch) -> Tensor:
        loss = self.maml.meta_backward(*batch)
        assert isinstance(loss, Tensor)
        return loss


class MetagradCompiled(Metagrad):
    compile = True


def _metagrad(algorithm: str, compiled: bool = False) -> type[Metagrad]:
    base = MetagradCompiled if compiled else Metagrad
    return type(f"{base.__name__}_{algorithm.replace('-', '_')}", (base,), {"algorithm": algorithm})


# ---------------------------------------------------------------- higher
def _higher(algorithm: str) -> Factory:
    def factory(model: nn.Module, loss_fn: LossFn, lr: float, steps: int, fo: bool) -> Step:
        import higher

        body, net = body_and_head(model) if algorithm == "anil" else (None, model)
        rates: list[Tensor] = []
        if algorithm == "metasgd":
            if fo:
                raise NotImplementedError(
                    "higher detaches the fast weights without track_higher_grads: "
                    "no gradient reaches the learned rates"
                )
            # one param group per tensor, so that override={'lr': [...]} gives each its rate
            rates = _new_rates(list(model.parameters()), lr)
            inner_opt: torch.optim.Optimizer = torch.optim.SGD(
                [{"params": [p]} for p in model.parameters()], lr=lr
            )
        elif algorithm == "maml-adam":
            inner_opt = torch.optim.Adam(net.parameters(), lr=lr, betas=(B1, B2), eps=EPS)
        else:
            inner_opt = torch.optim.SGD(net.parameters(), lr=lr)
        outer = list(net.parameters())
        fixed = [p for p in model.parameters() if all(p is not q for q in outer)]  # ANIL body

        def step(batch: Batch) -> Tensor:
            tasks, total = batch[0].shape[0], batch[0].new_zeros(())
            for sx, sy, qx, qy in zip(*batch, strict=True):
                if body is not None:
                    sx, qx = body(sx), body(qx)
                with higher.innerloop_ctx(
                    net, inner_opt, copy_initial_weights=False, track_higher_grads=not fo,
                    override={"lr": rates} if rates else None,
                ) as (fmodel, diffopt):  # fmt: skip
                    for _ in range(steps):
                        diffopt.step(loss_fn(fmodel(sx), sy))
                    loss = loss_fn(fmodel(qx), qy) / tasks
                    if fo:  # fast weights are detached (no meta-gradient at all from backward()):
                        # FOMAML adds d(query)/d(fast weights) to the initial weights' grads
                        targets = [*fmodel.parameters(), *fixed]
                        grads = torch.autograd.grad(loss, targets, allow_unused=True)
                        for p, g in zip([*outer, *fixed], grads, strict=True):
                            if g is not None:
                                p.grad = g if p.grad is None else p.grad + g
                    else:
                        loss.backward()  # per task, as in higher's MAML example
                total = total + loss.detach()
            return total

        return WithRates(step, rates) if rates else step

    return factory


# ---------------------------------------------------------------- functional loops
Update = Callable[[dict, dict, object], tuple[dict, object]]
MakeUpdate = Callable[[float, "dict[str, Tensor] | None"], Update]


def _functional_loop(make_update: MakeUpdate, algorithm: str = "maml", split: bool = False) -> Factory:  # fmt: skip
    """A per-task loop on ``torch.func.functional_call``; ``make_update(lr, rates)`` makes the
    inner steps (``rates``: Meta-SGD's learned tensors, else None). ``split``: ANIL on the
    body's features, computed once per task (else the whole model runs every step)."""

    def factory(model: nn.Module, loss_fn: LossFn, lr: float, steps: int, fo: bool) -> Step:
        body, net = body_and_head(model) if split and algorithm == "anil" else (None, model)
        params = dict(net.named_parameters())
        buffers = dict(net.named_buffers())
        names = list(params) if net is not model else adapted_names(model, algorithm)
        rates = None
        if algorithm == "metasgd":
            rates = dict(zip(names, _new_rates([params[n] for n in names], lr), strict=True))
        update = make_update(lr, rates)

        def step(batch: Batch) -> Tensor:
            losses = []
            for sx, sy, qx, qy in zip(*batch, strict=True):
                if body is not None:
                    sx, qx = body(sx), body(qx)
                p, state = params, None
                for _ in range(steps):
                    loss = loss_fn(functional_call(net, (p, buffers), (sx,)), sy)
                    g = torch.autograd.grad(loss, [p[n] for n in names], create_graph=not fo)
                    new, state = update({n: p[n] for n in names}, dict(zip(names, g, strict=True)), state)  # fmt: skip
                    p = {**p, **new}
                losses.append(loss_fn(functional_call(net, (p, buffers), (qx,)), qy))
            loss = torch.stack(losses).mean()
            loss.backward()
            return loss

        return WithRates(step, list(rates.values())) if rates else step

    return factory


def _sgd(lr: float, rates: dict[str, Tensor] | None) -> Update:
    """``theta - lr * g`` (``theta - alpha * g`` with learned rates)."""
    if rates is not None:
        return lambda p, g, state: ({k: v - rates[k] * g[k] for k, v in p.items()}, None)
    return lambda p, g, state: ({k: v - lr * g[k] for k, v in p.items()}, None)


def _masked_sqrt(x: Tensor) -> Tensor:
    """``sqrt(x)`` with derivative 0 instead of inf at ``x = 0`` (an exactly zero gradient
    entry; the Adam direction ``g / (|g| + eps)`` has the finite derivative ``1/eps`` there)."""
    pos = x > 0
    return torch.where(pos, torch.where(pos, x, 1.0).sqrt(), 0.0)


def _adam(
    formula: str = "torch",
    sqrt: Callable[[Tensor], Tensor] = _masked_sqrt,
    float32_bc: bool = False,
) -> MakeUpdate:
    """Inner Adam written out. ``formula="torch"``: torch.optim.Adam's
    ``m_hat / (sqrt(v_hat) + eps)``; ``"eps-before-correction"``: higher's (and torch's
    before 1.5) ``sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)``, i.e. eps divided by
    ``sqrt(1 - b2^t)``. ``sqrt=torch.sqrt``: the naive derivative (NaN at a zero entry).
    ``float32_bc``: the bias corrections ``1 - b^t`` computed in float32 (as TorchOpt does:
    a Python float to the power of its int64 step-count tensor is a float32 tensor)."""

    def correction(b: float, t: int) -> float:
        return float(1 - torch.pow(b, torch.tensor(t))) if float32_bc else 1 - b**t

    def make(lr: float, rates: dict[str, Tensor] | None) -> Update:
        def update(p: dict, g: dict, state: object) -> tuple[dict, object]:
            t, m0, v0 = state if isinstance(state, tuple) else (0, None, None)
            t += 1
            c1, c2 = correction(B1, t), correction(B2, t)
            m = {k: (1 - B1) * x if m0 is None else B1 * m0[k] + (1 - B1) * x for k, x in g.items()}
            v = {k: (1 - B2) * x * x if v0 is None else B2 * v0[k] + (1 - B2) * x * x for k, x in g.items()}  # fmt: skip
            if formula == "torch":
                d = {k: (m[k] / c1) / (sqrt(v[k] / c2) + EPS) for k in g}
            else:
                d = {k: m[k] / (sqrt(v[k]) + EPS) * (math.sqrt(c2) / c1) for k in g}
            return {k: x - lr * d[k] for k, x in p.items()}, (t, m, v)

        return update

    return make


def _torchopt(make_opt: Callable[[float], object]) -> MakeUpdate:
    """A TorchOpt functional optimizer (``make_opt(lr)``) as the inner update."""

    def make(lr: float, rates: dict[str, Tensor] | None) -> Update:
        import torchopt

        opt = make_opt(lr)

        def update(p: dict, g: dict, state: object) -> tuple[dict, object]:
            state = opt.init(p) if state is None else state  # type: ignore[attr-defined]
            updates, state = opt.update(g, state, inplace=False)  # type: ignore[attr-defined]
            return torchopt.apply_updates(p, updates, inplace=False), state

        return update

    return make


def _torchopt_sgd(lr: float) -> object:
    import torchopt

    return torchopt.sgd(lr=lr)


def _torchopt_adam(lr: float) -> object:
    import torchopt

    return torchopt.adam(lr=lr, betas=(B1, B2), eps=EPS)


def _torchopt_learned_sgd(lr: float, rates: dict[str, Tensor] | None) -> Update:
    """Meta-SGD with TorchOpt's tools: its lr is one float (or a schedule of the step count),
    so the updates ``-alpha * g`` are built with its pytree map and applied by it."""
    import torchopt

    assert rates is not None

    def update(p: dict, g: dict, state: object) -> tuple[dict, object]:
        updates = torchopt.pytree.tree_map(lambda a, x: -a * x, {k: rates[k] for k in g}, g)
        return torchopt.apply_updates(p, updates, inplace=False), state

    return update


# ---------------------------------------------------------------- TorchOpt MetaOptimizer
def _torchopt_meta(algorithm: str) -> Factory:
    """TorchOpt's object-oriented ``MetaSGD``/``MetaAdam`` (in-place differentiable steps on
    the module, undone per task with ``extract_state_dict``/``recover_state_dict``)."""

    def factory(model: nn.Module, loss_fn: LossFn, lr: float, steps: int, fo: bool) -> Step:
        import torchopt

        name = "MetaAdam" if algorithm == "maml-adam" else "MetaSGD"
        if fo:
            raise NotImplementedError(f"{name} always differentiates through the inner step")
        if algorithm == "metasgd":
            raise NotImplementedError(
                "MetaSGD's lr is one float for every parameter: no learned per-parameter rates"
            )
        body, net = body_and_head(model) if algorithm == "anil" else (None, model)
        if algorithm == "maml-adam":
            inner_opt: torchopt.MetaOptimizer = torchopt.MetaAdam(net, lr=lr, betas=(B1, B2), eps=EPS)  # fmt: skip
        else:
            inner_opt = torchopt.MetaSGD(net, lr=lr)

        def step(batch: Batch) -> Tensor:
            net_state = torchopt.extract_state_dict(net, by="reference", detach_buffers=True)
            opt_state = torchopt.extract_state_dict(inner_opt, by="reference")
            losses = []
            for sx, sy, qx, qy in zip(*batch, strict=True):
                if body is not None:
                    sx, qx = body(sx), body(qx)
                for _ in range(steps):
                    inner_opt.step(loss_fn(net(sx), sy))
                losses.append(loss_fn(net(qx), qy))
                torchopt.recover_state_dict(net, net_state)
                torchopt.recover_state_dict(inner_opt, opt_state)
            loss = torch.stack(losses).mean()
            loss.backward()
            return loss

        return step

    return factory


# ---------------------------------------------------------------- iMAML
def _implicit_only(fo: bool) -> None:
    if fo:
        raise NotImplementedError("iMAML's meta-gradient is implicit: no first-order variant")


def _higher_imaml(model: nn.Module, loss_fn: LossFn, lr: float, steps: int, fo: bool) -> Step:
    raise NotImplementedError(
        "higher differentiates through the unrolled inner loop and has no implicit "
        "differentiation (an iMAML with it would be the autograd row's hand-written CG)"
    )


def _torchopt_imaml(model: nn.Module, loss_fn: LossFn, lr: float, steps: int, fo: bool) -> Step:
    """``torchopt.diff.implicit.custom_root`` with the optimality condition
    ``grad_phi [L_support(phi) + LAM/2 |phi - theta|^2] = 0`` (``torch.func.grad`` of the
    proximal objective) and ``torchopt.linear_solve.solve_cg``; the decorated solver runs
    the same gradient steps from theta. TorchOpt solves ``(H + LAM I)^T u = -g`` and returns
    ``-LAM u``: metagrad's system divided by ``-LAM``, so its absolute tolerance is metagrad's
    divided by LAM (``rtol=0``: its default stop is relative, ``|r| <= 1e-5 |b|``)."""
    import torchopt

    _implicit_only(fo)
    names = [n for n, _ in model.named_parameters()]
    theta = tuple(model.parameters())
    buffers = dict(model.named_buffers())

    def objective(phi: tuple[Tensor, ...], meta: tuple[Tensor, ...], x: Tensor, y: Tensor) -> Tensor:  # fmt: skip
        out = functional_call(model, (dict(zip(names, phi, strict=True)), buffers), (x,))
        prox = sum(((p - m) ** 2).sum() for p, m in zip(phi, meta, strict=True))
        return loss_fn(out, y) + 0.5 * LAM * prox

    optimality = torch.func.grad(objective, argnums=0)
    cg = torchopt.linear_solve.solve_cg(maxiter=CG_STEPS, rtol=0.0, atol=math.sqrt(CG_TOL) / LAM)

    @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=cg)
    def solve(phi: tuple[Tensor, ...], meta: tuple[Tensor, ...], x: Tensor, y: Tensor) -> tuple[Tensor, ...]:  # fmt: skip
        for _ in range(steps):
            phi = tuple(p - lr * g for p, g in zip(phi, optimality(phi, meta, x, y), strict=True))
        return phi

    def step(batch: Batch) -> Tensor:
        tasks, total = batch[0].shape[0], batch[0].new_zeros(())
        for sx, sy, qx, qy in zip(*batch, strict=True):
            phi = solve(tuple(p.detach() for p in theta), theta, sx, sy)
            out = functional_call(model, (dict(zip(names, phi, strict=True)), buffers), (qx,))
            loss = loss_fn(out, qy) / tasks
            loss.backward()  # per task: each has its own linear system
            total = total + loss.detach()
        return total

    return step


def _autograd_imaml(model: nn.Module, loss_fn: LossFn, lr: float, steps: int, fo: bool) -> Step:
    """The reference: plain ``torch.autograd.grad`` inner steps, Hessian-vector products by
    double backward (``grad_outputs`` through the support gradient), CG on lists of tensors
    written out for ``(H + LAM I) v = LAM grad L_query``."""
    _implicit_only(fo)
    names = [n for n, _ in model.named_parameters()]
    theta = list(model.parameters())
    buffers = dict(model.named_buffers())

    def f(ps: list[Tensor], x: Tensor) -> Tensor:
        return functional_call(model, (dict(zip(names, ps, strict=True)), buffers), (x,))

    def dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
        return sum((u * w).sum() for u, w in zip(a, b, strict=True))  # type: ignore[return-value]

    def task(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[list[Tensor], Tensor]:
        th = [p.detach() for p in theta]
        phi = th
        for _ in range(steps):
            phi = [p.detach().requires_grad_() for p in phi]
            prox = sum(((p - t) ** 2).sum() for p, t in zip(phi, th, strict=True))
            gs = torch.autograd.grad(loss_fn(f(phi, sx), sy) + 0.5 * LAM * prox, phi)
            phi = [p.detach() - lr * g for p, g in zip(phi, gs, strict=True)]
        phi = [p.detach().requires_grad_() for p in phi]
        query = loss_fn(f(phi, qx), qy)
        b = [LAM * g for g in torch.autograd.grad(query, phi)]
        support_grad = torch.autograd.grad(loss_fn(f(phi, sx), sy), phi, create_graph=True)

        def matvec(v: list[Tensor]) -> list[Tensor]:
            hv = torch.autograd.grad(support_grad, phi, grad_outputs=v, retain_graph=True)
            return [h + LAM * u for h, u in zip(hv, v, strict=True)]

        x = [torch.zeros_like(u) for u in b]
        r, p = [u.clone() for u in b], [u.clone() for u in b]
        rr = dot(r, r)
        for _ in range(CG_STEPS):
            if rr < CG_TOL:
                break
            ap = matvec(p)
            alpha = rr / dot(p, ap)
            x = [u + alpha * w for u, w in zip(x, p, strict=True)]
            r = [u - alpha * w for u, w in zip(r, ap, strict=True)]
            new = dot(r, r)
            p = [u + (new / rr) * w for u, w in zip(r, p, strict=True)]
            rr = new
        return x, query.detach()

    def step(batch: Batch) -> Tensor:
        tasks = batch[0].shape[0]
        total, losses = [torch.zeros_like(p) for p in theta], []
        for sx, sy, qx, qy in zip(*batch, strict=True):
            v, loss = task(sx, sy, qx, qy)
            total = [t + u / tasks for t, u in zip(total, v, strict=True)]
            losses.append(loss)
        with torch.no_grad():
            for p, g in zip(theta, total, strict=True):
                p.grad = g if p.grad is None else p.grad + g
        return torch.stack(losses).mean()

    return step


# ---------------------------------------------------------------- registry
Entry = tuple[str, Factory, str]  # module that must be importable, factory, idiom in the report

# name -> entry, for MAML (the names and idioms of the published results)
LIBS: dict[str, Entry] = {
    "metagrad": ("metagrad", Metagrad, "MAML.meta_backward (default strategy)"),
    "metagrad-compile": (
        "metagrad",
        MetagradCompiled,
        "MAML(compile=True).meta_backward (compile time apart)",
    ),
    "higher": ("higher", _higher("maml"), "innerloop_ctx, SGD, per-task backward"),
    "torchopt": (
        "torchopt",
        _functional_loop(_torchopt(_torchopt_sgd)),
        "torchopt.sgd + functional_call",
    ),
    "torchopt-metasgd": (
        "torchopt",
        _torchopt_meta("maml"),
        "MetaSGD + extract/recover_state_dict",
    ),  # fmt: skip
    "autograd": ("torch", _functional_loop(_sgd), "plain autograd.grad loop (reference)"),
}

_ANIL_SPLIT = "features once per task, head adapted on them"
LIBS_BY_ALGORITHM: dict[str, dict[str, Entry]] = {
    "maml": LIBS,
    "metasgd": {
        "metagrad": ("metagrad", _metagrad("metasgd"), "MetaSGD.meta_backward (default strategy)"),
        "metagrad-compile": (
            "metagrad",
            _metagrad("metasgd", compiled=True),
            "MetaSGD(compile=True).meta_backward (compile time apart)",
        ),
        "higher": (
            "higher",
            _higher("metasgd"),
            "innerloop_ctx, SGD with one param group per tensor, "
            "override={'lr': learned rates}, per-task backward",
        ),
        "torchopt": (
            "torchopt",
            _functional_loop(_torchopt_learned_sgd, "metasgd"),
            "functional_call + torchopt.apply_updates of -alpha*g "
            "(TorchOpt's optimizers take one float lr)",
        ),
        "torchopt-metasgd": ("torchopt", _torchopt_meta("metasgd"), "MetaSGD (fixed lr)"),
        "autograd": (
            "torch",
            _functional_loop(_sgd, "metasgd"),
            "plain autograd.grad loop, theta - alpha*g (reference)",
        ),
    },
    "anil": {
        "metagrad": ("metagrad", _metagrad("anil"), "ANIL.meta_backward (default strategy)"),
        "metagrad-compile": (
            "metagrad",
            _metagrad("anil", compiled=True),
            "ANIL(compile=True).meta_backward (compile time apart)",
        ),
        "higher": (
            "higher",
            _higher("anil"),
            f"innerloop_ctx on the head, SGD; {_ANIL_SPLIT}; per-task backward",
        ),
        "torchopt": (
            "torchopt",
            _functional_loop(_torchopt(_torchopt_sgd), "anil", split=True),
            f"torchopt.sgd + functional_call of the head; {_ANIL_SPLIT}",
        ),
        "torchopt-metasgd": (
            "torchopt",
            _torchopt_meta("anil"),
            f"MetaSGD on the head + extract/recover_state_dict; {_ANIL_SPLIT}",
        ),
        "autograd": (
            "torch",
            _functional_loop(_sgd, "anil"),
            "plain autograd.grad loop, whole model per step, head adapts (reference)",
        ),
    },
    "maml-adam": {
        "metagrad": (
            "metagrad",
            _metagrad("maml-adam"),
            "MAML(inner_optimizer=mg.inner.Adam()).meta_backward (default strategy)",
        ),
        "metagrad-compile": (
            "metagrad",
            _metagrad("maml-adam", compiled=True),
            "MAML(inner_optimizer=Adam(), compile=True).meta_backward (compile time apart)",
        ),
        "higher": ("higher", _higher("maml-adam"), "innerloop_ctx, Adam, per-task backward"),
        "torchopt": (
            "torchopt",
            _functional_loop(_torchopt(_torchopt_adam)),
            "torchopt.adam + functional_call",
        ),
        "torchopt-metaadam": (
            "torchopt",
            _torchopt_meta("maml-adam"),
            "MetaAdam + extract/recover_state_dict",
        ),
        "autograd": (
            "torch",
            _functional_loop(_adam()),
            "plain autograd.grad loop, torch.optim.Adam's formula written out (reference)",
        ),
    },
    "imaml": {
        "metagrad": (
            "metagrad",
            _metagrad("imaml"),
            f"iMAML(lam={LAM}, cg_steps={CG_STEPS}).meta_backward",
        ),
        "higher": ("higher", _higher_imaml, "-"),
        "torchopt": (
            "torchopt",
            _torchopt_imaml,
            "diff.implicit.custom_root(func.grad(proximal objective)), "
            f"linear_solve.solve_cg(maxiter={CG_STEPS}), per-task backward",
        ),
        "autograd": (
            "torch",
            _autograd_imaml,
            "plain autograd.grad inner steps, double-backward HVPs, CG written out (reference)",
        ),
    },
}

# Known ways an implementation may differ, as references of their own: a peer that fails
# the check is compared with each, so that the report names the difference.
# short name -> (what it means, _adam's arguments)
ADAM_DIFFERENCES: dict[str, tuple[str, dict]] = {
    "eps-before-bc": (
        "eps added to sqrt(v) before v's bias correction, i.e. eps/sqrt(1-b2^t) "
        "(the Adam paper's 'efficient' form, older torch.optim's)",
        {"formula": "eps-before-correction"},
    ),
    "plain-sqrt": (
        "sqrt differentiated naively: inf derivative, so NaN, where an inner-gradient entry "
        "is exactly 0",
        {"sqrt": torch.sqrt},
    ),
    "float32-bc": ("bias corrections 1-b^t computed in float32", {"float32_bc": True}),
}
VARIANTS: dict[str, dict[str, Factory]] = {
    "maml-adam": {
        "+".join(names): _functional_loop(
            _adam(**{k: v for n in names for k, v in ADAM_DIFFERENCES[n][1].items()})
        )
        for r in (1, 2, 3)
        for names in itertools.combinations(ADAM_DIFFERENCES, r)
    },
}
VARIANT_LEGEND: dict[str, dict[str, str]] = {
    "maml-adam": {k: v[0] for k, v in ADAM_DIFFERENCES.items()},
}


def missing(name: str, algorithm: str = "maml") -> str | None:
    """Why library ``name`` cannot run here, or None."""
    module = LIBS_BY_ALGORITHM[algorithm][name][0]
    if importlib.util.find_spec(module) is None:
        return f"{module} not installed"
    return None
