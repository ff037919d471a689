"""Training health: is the model learning, or sitting on a collapse?

A contrastive run can look busy (the loss moves, the gradients are finite) while its embeddings
carry no information. Two signals catch that early, long before a retrieval eval would:

- statistics of the step's own embeddings (`embedding_metrics`, computed inside the jitted step
  on `rows` evenly spaced rows of the global batch, on log steps only, and logged as
  `train/health/...`):
  alignment E||f(x) - g(y)||^2 over the positive pairs and, per tower, uniformity
  log E exp(-2 ||f(x) - f(x')||^2) over all distinct pairs (Wang & Isola 2020); the effective
  rank exp(H(sigma / sum sigma)) of each tower's embedding matrix (Roy & Vetterli 2007); and the
  mean positive / negative and the spread of the cross-tower cosines;
- the loss against its collapse value (`collapse_loss`): with every logit alike the sigmoid loss
  is ln B + 1 (more exactly ln B + (B - 1) ln(B / (B - 1))) and InfoNCE ln B at batch B.

`diagnose` turns the logged history into findings (plateau, cosines alike, a collapsed tower);
`Monitor` is the loop's thin stateful wrapper that prints each finding once when it starts.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from mmjax.types import ConfigError

log = logging.getLogger(__name__)

# The contrastive pair whose statistics are logged, first present wins: image-text runs,
# audio-text runs, text-text pairs, the LLM embedder.
PAIRS = (('image', 'text'), ('audio', 'text'), ('query', 'text'), ('query', 'candidate'))
PREFIX = 'health/'


# ---------------------------------------------------------------------------------------------
# Embedding statistics (jnp, inside the step).


def _gram(x: jax.Array, y: jax.Array) -> jax.Array:
  # Full f32 precision: TPUs otherwise multiply f32 in bf16 passes, too coarse for the spectrum.
  return jnp.matmul(x, y.T, precision=jax.lax.Precision.HIGHEST)


def _sq_dists(x: jax.Array, y: jax.Array) -> jax.Array:
  """[n, m] squared Euclidean distances (clipped at 0: rounding may push them below)."""
  d = jnp.sum(x * x, -1)[:, None] + jnp.sum(y * y, -1)[None, :] - 2.0 * _gram(x, y)
  return jnp.maximum(d, 0.0)


def alignment(x: jax.Array, y: jax.Array) -> jax.Array:
  """Wang & Isola's alignment (alpha = 2): the mean squared distance of the positive pairs."""
  return jnp.mean(jnp.sum((x - y) ** 2, -1))


def uniformity(x: jax.Array, t: float = 2.0) -> jax.Array:
  """Wang & Isola's uniformity: log of the mean of exp(-t ||x_i - x_j||^2) over pairs i != j.

  0 when every embedding is the same point; about -t * 2 = -4 for points spread uniformly over a
  high-dimensional unit sphere.
  """
  n = x.shape[0]
  e = -t * _sq_dists(x, x)
  e = jnp.where(jnp.eye(n, dtype=bool), -jnp.inf, e)
  return jax.nn.logsumexp(e) - jnp.log(n * (n - 1.0))


def effective_rank(x: jax.Array) -> jax.Array:
  """Roy & Vetterli's effective rank of the [n, d] matrix x: exp of the entropy of its
  normalised singular values; 1 for rank one, min(n, d) for equal singular values.

  The singular values come from the [n, n] Gram matrix (eigenvalues = sigma^2), which costs far
  less than an SVD when n is a few hundred rows of a wide embedding. Eigenvalues under the Gram's
  rounding floor (n * eps * the largest) count as 0: their square roots would otherwise add a
  spurious sqrt(n * eps) tail of singular values (0.6% of the largest at n = 256).
  """
  lam = jnp.linalg.eigvalsh(_gram(x, x))
  floor = x.shape[0] * jnp.finfo(lam.dtype).eps * jnp.max(lam)
  sigma = jnp.sqrt(jnp.where(lam > floor, lam, 0.0))
  p = sigma / jnp.maximum(jnp.sum(sigma), 1e-30)
  return jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)))


def cosine_stats(x: jax.Array, y: jax.Array) -> dict[str, jax.Array]:
  """Mean cosine of the positives (i, i) and of the negatives (i != j), and the standard deviation
  of all n x n cross cosines: ~0 on the collapse plateau, where every pair looks the same."""
  unit = lambda z: z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)  # noqa: E731
  c = _gram(unit(x), unit(y))
  n = c.shape[0]
  pos = jnp.trace(c) / n
  neg = (jnp.sum(c) - jnp.trace(c)) / (n * (n - 1.0))
  return {'cos_pos': pos, 'cos_neg': neg, 'cos_std': jnp.std(c)}


def pair_roles(embs: Mapping[str, Any]) -> tuple[str, str] | None:
  """The (query, candidate) roles of the embeddings dict that the statistics describe."""
  return next((p for p in PAIRS if p[0] in embs and p[1] in embs), None)


def embedding_metrics(embs: Mapping[str, jax.Array], rows: int) -> dict[str, jax.Array]:
  """`health/...` metrics of `rows` evenly spaced rows of the pair's embeddings (no gradient).

  A subsample keeps the cost at O(rows^2 d + rows^3) whatever the batch. Evenly spaced rather
  than the first rows: every device's shard and every block of a mixture's sub-batches is in it.
  The effective rank is at most min(rows, d).
  """
  roles = pair_roles(embs)
  n = embs[roles[0]].shape[0] if roles else 0
  if min(rows, n) < 2:  # No pairs i != j to measure.
    return {}
  stride = max(1, n // rows)
  q, c = (jax.lax.stop_gradient(embs[r][::stride][:rows]).astype(jnp.float32) for r in roles)
  out = {'alignment': alignment(q, c), **cosine_stats(q, c)}
  for role, z in zip(roles, (q, c)):
    out[f'{role}/uniformity'] = uniformity(z)
    out[f'{role}/effective_rank'] = effective_rank(z)
  return {PREFIX + k: v for k, v in out.items()}


@dataclasses.dataclass(frozen=True)
class Instrumented:
  """An objective whose metrics gain `embedding_metrics` of its embeddings: the step's hook.

  Wrapping the objective (rather than the step) gives GradCache and plain backprop the very same
  statistics of the whole global batch, and leaves the loss and gradients untouched. Bound to the
  step being computed (`at_step`), it computes them only on the steps the loop logs (NaN on the
  others): the eigenvalue decomposition behind the effective rank runs in LAPACK on CPU, whose
  threads fight XLA's for the cores (+41% on the demo step when computed every step on 2 cores).
  """

  objective: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
  rows: int
  log_every: int = 1  # The loop logs after steps log_every, 2 * log_every, ... and total_steps.
  total_steps: int = 0
  step: Any = None  # The (traced) state.step of the step being computed; None: every call.

  def logged(self, step: jax.Array) -> jax.Array:
    """Whether the loop logs the metrics of the step that starts at `step` (it logs step + 1)."""
    return ((step + 1) % self.log_every == 0) | (step + 1 == self.total_steps)

  @property
  def uses_heads(self) -> bool:
    return bool(getattr(self.objective, 'uses_heads', False))

  def __call__(self, embs, t, b, batch, **kwargs):  # kwargs: the step's heads= (ITM, captions).
    loss, metrics = self.objective(embs, t, b, batch, **kwargs)
    stats = lambda: embedding_metrics(embs, self.rows)  # noqa: E731
    if self.step is not None:
      shapes = jax.eval_shape(stats)
      skipped = lambda: {k: jnp.full(v.shape, jnp.nan, v.dtype) for k, v in shapes.items()}  # noqa: E731
      return loss, {**metrics, **jax.lax.cond(self.logged(self.step), stats, skipped)}
    return loss, {**metrics, **stats()}


def instrument(objective, config):
  """`objective` with the health metrics of config.health (itself when health.rows == 0)."""
  rows = Settings.from_config(config).rows
  if not rows:
    return objective
  return Instrumented(objective, rows, config.log_every_steps, config.total_steps)


def at_step(opts, step: jax.Array):
  """The step options `opts` with their instrumented objective bound to `step` (see
  `Instrumented`); other objectives unchanged."""
  if not isinstance(opts.objective, Instrumented):
    return opts
  return dataclasses.replace(opts, objective=dataclasses.replace(opts.objective, step=step))


def logged_values(host_metrics: Sequence[Mapping[str, Any]]) -> dict[str, float]:
  """`train/health/...` of a log interval's per-step metrics: the last step's (the only one that
  computed them), where the loop averages the other metrics over the interval."""
  last = host_metrics[-1]
  return {f'train/{k}': float(v) for k, v in last.items() if k.startswith(PREFIX)}


# ---------------------------------------------------------------------------------------------
# The detector (plain Python, on the logged history).


@dataclasses.dataclass(frozen=True)
class Settings:
  """config.health (configs/base.py documents each field)."""

  rows: int = 256
  patience: int = 5
  plateau_tolerance: float = 0.1
  min_effective_rank: float = 2.0
  max_uniformity: float = -0.1
  min_cosine_std: float = 0.02

  @classmethod
  def from_config(cls, config) -> Settings:
    """The run's settings; a ConfigError naming the key for an impossible value."""
    h = config.health
    checks = (('rows', h.rows >= 0, '>= 0 (0 turns the health metrics off)'),
              ('patience', h.patience >= 1, '>= 1'),
              ('plateau_tolerance', 0 < h.plateau_tolerance < 1, 'in (0, 1)'),
              ('min_effective_rank', h.min_effective_rank >= 1, '>= 1'),
              ('max_uniformity', h.max_uniformity <= 0, '<= 0'),
              ('min_cosine_std', h.min_cosine_std >= 0, '>= 0'))
    for key, ok, want in checks:
      if not ok:
        raise ConfigError(f'config.health.{key}={h[key]} must be {want}.')
    return cls(**{f.name: h[f.name] for f in dataclasses.fields(cls)})


def collapse_loss(kind: str, batch_size: int) -> float:
  """The loss when every logit of the batch is alike (the best the towers can do while carrying no
  information): sigmoid min_z softplus(-z) + (B - 1) softplus(z) = ln B + (B - 1) ln(B / (B - 1))
  (about ln B + 1); softmax (InfoNCE) ln B. In-batch negatives only (hard negatives add to it)."""
  b = batch_size
  if kind == 'sigmoid':
    return math.log(b) + (b - 1) * math.log(b / (b - 1))
  if kind == 'softmax':
    return math.log(b)
  raise ValueError(f'Unknown loss kind {kind!r}: expected sigmoid or softmax.')


@dataclasses.dataclass(frozen=True)
class Finding:
  """A condition that held over at least `patience` consecutive log points, steps since..until."""

  kind: str  # 'plateau' | 'cosines_alike' | 'collapse/<role>'
  since: int
  until: int
  message: str  # Describes the condition at `until`.


def _loss_key(row: Mapping[str, float]) -> str:
  # Multi-task runs log the contrastive term on its own: that is the one with a collapse value.
  return 'train/loss/contrastive' if 'train/loss/contrastive' in row else 'train/loss'


def _runs(rows: Sequence[Mapping[str, float]], holds: Callable[[Mapping], bool],
          patience: int) -> list[tuple[int, int]]:
  """(first, last) row indices of every maximal run of rows where `holds`, >= patience long."""
  out, start = [], None
  for i, row in enumerate(list(rows) + [None]):
    if row is not None and holds(row):
      start = i if start is None else start
    elif start is not None:
      if i - start >= patience:
        out.append((start, i - 1))
      start = None
  return out


def _checks(loss_kind: str, batch_size: int, s: Settings, roles: Sequence[str]):
  """(kind, predicate on a log row, message about a row) of each condition."""
  ref = collapse_loss(loss_kind, batch_size)
  name = 'ln B + 1' if loss_kind == 'sigmoid' else 'ln B'
  h = 'train/' + PREFIX

  def has(row, *keys):
    return all(k in row for k in keys)

  def cosines(r):
    if not has(r, h + 'cos_pos', h + 'cos_neg'):
      return ''
    return f' (cosines: positives {r[h + "cos_pos"]:.3f}, negatives {r[h + "cos_neg"]:.3f})'

  yield ('plateau', lambda r: abs(r[_loss_key(r)] / ref - 1) <= s.plateau_tolerance,
         lambda r: (f'the {loss_kind} loss {r[_loss_key(r)]:.3f} sits within '
                    f'{100 * s.plateau_tolerance:.0f}% of its collapse value {ref:.3f} ({name}, '
                    f'B={batch_size}, every pair scored alike): the run has not left the '
                    f'collapse plateau{cosines(r)}. Try the bias at -ln B, another learning rate '
                    'or a longer warm-up.'))
  yield ('cosines_alike', lambda r: has(r, h + 'cos_std') and r[h + 'cos_std'] < s.min_cosine_std,
         lambda r: (f'all cross-tower cosines of the batch are alike (std '
                    f'{r[h + "cos_std"]:.4f} < {s.min_cosine_std}): the towers do not rank.'))
  for role in roles:
    rank, unif = f'{h}{role}/effective_rank', f'{h}{role}/uniformity'
    yield (f'collapse/{role}',
           lambda r, rank=rank, unif=unif: has(r, rank, unif) and (
               r[rank] < s.min_effective_rank or r[unif] > s.max_uniformity),
           lambda r, role=role, rank=rank, unif=unif: (
               f'the {role} embeddings collapsed: effective rank {r[rank]:.2f} (collapse below '
               f'{s.min_effective_rank}), uniformity {r[unif]:.3f} (collapse above '
               f'{s.max_uniformity}; 0 = one point).'))


def logged_roles(rows: Sequence[Mapping[str, float]]) -> list[str]:
  """The towers whose health metrics the rows hold, in the order first logged."""
  h, roles = 'train/' + PREFIX, []
  for row in rows:
    for k in row:
      if k.startswith(h) and k.endswith('/effective_rank'):
        role = k[len(h):-len('/effective_rank')]
        if role not in roles:
          roles.append(role)
  return roles


def episodes(history: Sequence[Mapping[str, float]], *, loss_kind: str, batch_size: int,
             settings: Settings = Settings()) -> list[Finding]:
  """Every stretch of the run where a condition held for `settings.patience` or more consecutive
  train log rows of `history` (metrics.jsonl rows with a 'step', oldest first; rows without
  'train/loss', i.e. eval rows, are skipped)."""
  rows = [r for r in history if 'train/loss' in r]
  found = []
  for kind, holds, message in _checks(loss_kind, batch_size, settings, logged_roles(rows)):
    for i, j in _runs(rows, holds, settings.patience):
      found.append(Finding(kind, int(rows[i]['step']), int(rows[j]['step']), message(rows[j])))
  return sorted(found, key=lambda f: (f.since, f.kind))


def diagnose(history: Sequence[Mapping[str, float]], *, loss_kind: str, batch_size: int,
             settings: Settings = Settings()) -> list[Finding]:
  """The conditions that hold at the end of `history`: its `episodes` that reach the last row."""
  rows = [r for r in history if 'train/loss' in r]
  if not rows:
    return []
  last = rows[-1]['step']
  return [f for f in episodes(rows, loss_kind=loss_kind, batch_size=batch_size, settings=settings)
          if f.until == last]


class Monitor:
  """The loop's health check: feed it every train summary; it warns once when a condition starts
  (and says when it ends). Only the last `patience` rows are kept: diagnose needs no more."""

  def __init__(self, loss_kind: str, batch_size: int, settings: Settings, enabled: bool = True):
    self.loss_kind, self.batch_size, self.settings = loss_kind, batch_size, settings
    self.enabled = enabled
    self._rows: list[dict[str, float]] = []
    self.active: dict[str, Finding] = {}

  @classmethod
  def for_run(cls, config) -> Monitor:
    """The run's monitor (quiet on processes other than 0: one warning per run, not per host)."""
    return cls(config.loss.kind, config.batch_size, Settings.from_config(config),
               enabled=jax.process_index() == 0)

  def observe(self, step: int, summary: Mapping[str, float],
              echo: Callable[[str], Any] | None = None) -> list[Finding]:
    """Adds one train log row; returns the findings that start at it, and reports them (and the
    ends of earlier ones) with `echo` (e.g. the progress bar's write, so that the bar stays
    whole), else with the logger."""
    if not self.enabled:
      return []
    self._rows = (self._rows + [{'step': step, **summary}])[-self.settings.patience:]
    now = {f.kind: f for f in diagnose(self._rows, loss_kind=self.loss_kind,
                                       batch_size=self.batch_size, settings=self.settings)}
    new = [f for k, f in now.items() if k not in self.active]
    for f in new:
      _say(logging.WARNING, f'Training health at step {step} (since step {f.since}): {f.message}',
           echo)
    for k in sorted(self.active.keys() - now.keys()):
      _say(logging.INFO, f'Training health at step {step}: {k} no longer holds.', echo)
    self.active = now
    return new


def _say(level: int, msg: str, echo: Callable[[str], Any] | None) -> None:
  if echo is None:
    log.log(level, '%s', msg)
  else:
    echo(f'{logging.getLevelName(level)}: {msg}' if level >= logging.WARNING else msg)
