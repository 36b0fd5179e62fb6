"""The offline (Lightning OPD) rollout source: the fixed rollouts precompute published, read once.

It mirrors :class:`lopd.train.online.OnlineSource` (same attributes and methods), so the opd
stage reads the same in both modes: resolve the source, build the engine from its student,
attach it, take each step's mini-batches from it, publish its inputs and lineage.

The stored ``rollout_logprobs`` are the SFT student's raw (temperature-1) log-probs (precompute's
lineage: ``rollout_logprobs: raw`` and the sampling parameters). They are the sampling
distribution's only when the rollouts were sampled at temperature 1 and top-p 1, so importance
weights and the KL-to-SFT guard, which compare them with the current policy's raw log-probs, are
refused for rollouts sampled otherwise (:func:`check_rollout_logprobs`). Rollouts cut at
``max_tokens`` (``finish_reason: length``) are kept as they are and counted (``truncated_rollouts``).
"""

from __future__ import annotations

from lopd import stage
from lopd.layout import stage_prefix
from lopd.manifest import InputRef
from lopd.stages import instance
from lopd.train.data import (
    OpdSample,
    TrainDataError,
    global_batch_indices,
    load_opd_samples,
    open_precompute,
    require_topk,
)
from lopd.train.opd import split_minis


def check_rollout_logprobs(cfg, lineage: dict, fallback_sampling=None, where: str = "precompute") -> None:
    """Refuse importance weights / ``kl_coef > 0`` when the stored rollout log-probs are not the
    sampling distribution's: raw log-probs of rollouts sampled with temperature != 1 or top-p < 1.
    ``lineage``: the precompute manifest's; ``fallback_sampling``: the recipe's
    ``precompute.sampling``, for data whose lineage predates the record (None: not checked)."""
    uses = [k for k, on in (("opd.importance_weights.enabled", cfg.importance_weights.enabled),
                            ("opd.kl_coef", cfg.kl_coef > 0)) if on]
    if not uses:
        return
    kind = lineage.get("rollout_logprobs", "raw")
    sp = lineage.get("sampling")
    if sp is None and fallback_sampling is not None:
        sp = fallback_sampling.model_dump()
    if sp is None or kind != "raw":
        if kind != "raw":
            raise TrainDataError(f"{where}: lineage.rollout_logprobs is {kind!r}; {' and '.join(uses)} need raw "
                                 "log-probs")
        return
    t, top_p = float(sp.get("temperature", 1.0)), float(sp.get("top_p", 1.0))
    if t != 1.0 or top_p < 1.0:
        raise TrainDataError(
            f"{' and '.join(uses)}: the rollouts were sampled at precompute.sampling.temperature={t:g}, "
            f"top_p={top_p:g} but rollout_logprobs are raw temperature-1 log-probs, not the sampling "
            "distribution's; set precompute.sampling.temperature: 1 and top_p: 1, or disable them")


class OfflineSource:
    """This rank's share of each global batch of the precomputed rollouts (and, every
    ``grad_discrepancy_every`` steps, the offline-vs-online gradient diagnostic)."""

    def __init__(self, run, student, samples: list[OpdSample], inputs: dict, lineage: dict, summary: dict):
        self.run, self.cfg, self.student, self.samples = run, run.section, student, samples
        self.inputs, self.lineage, self.summary = inputs, lineage, summary
        self.diagnostic = None
        self.plot_keys = ["grad_cosine", "grad_norm_ratio"] if self.cfg.grad_discrepancy_every else []

    @classmethod
    def from_run(cls, run) -> OfflineSource:
        """The precompute data (validated) and the SFT checkpoint that sampled it: ``opd.student``
        (or the one the precompute manifest names) must have the fingerprint that sampled it."""
        recipe, cfg = run.recipe, run.section
        prefix = (cfg.rollouts or stage_prefix(recipe.run_id, instance("precompute", run.round))).strip("/")
        m, sha = open_precompute(run.store, prefix, recipe.allow_inconsistent_teacher)
        own = cfg.rollouts is None and recipe.precompute is not None
        check_rollout_logprobs(cfg, m.lineage, recipe.precompute.sampling if own else None,
                               run.store.url(prefix))
        if cfg.objective == "topk":
            require_topk(m.lineage, run.store.url(prefix))
        if run.round > 1:  # a Lightning round starts from the previous round's output (lopd.rounds)
            ref = run.store.url(stage_prefix(recipe.run_id, instance("opd", run.round - 1)))
        else:
            ref = cfg.student or m.lineage.get("student") or run.store.url(stage_prefix(recipe.run_id, "sft"))
        student = stage.resolve_model(ref, "opd.student")
        sampled_by = m.lineage.get("student_fingerprint")
        if (sampled_by is not None or run.round > 1) and sampled_by != student.fingerprint:
            raise TrainDataError(f"opd.student: {ref} (fingerprint {student.fingerprint}) is not the model that "
                                 f"sampled the precomputed rollouts ({sampled_by})")
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(student.path).vocab_size
        samples, skipped = load_opd_samples(run.store, prefix, m, cfg.train.max_seq_len, vocab)
        stage.log("data", stage=run.stage, rows=len(samples), skipped_too_long=skipped, uri=run.store.url(prefix))
        inputs = {"student": student.input_ref(),
                  "precompute": InputRef(uri=run.store.url(prefix), manifest_sha256=sha)}
        keep = ("teacher_fingerprint", "sft_teacher_fingerprint", "teacher_consistent", "allow_inconsistent_teacher",
                "rollout_logprobs", "sampling", "teacher_topk", "round")
        lineage = {**{k: m.lineage.get(k) for k in keep}, "student_fingerprint": student.fingerprint,
                   "mode": "offline"}
        truncated = sum(s.finish_reason == "length" for s in samples)
        stage.log("rollouts", stage=run.stage, truncated=truncated,
                  without_finish_reason=sum(s.finish_reason is None for s in samples))
        return cls(run, student, samples, inputs, lineage, {"rows": len(samples), "skipped_too_long": skipped,
                                                            "truncated_rollouts": truncated})

    def attach(self, run) -> None:
        """Start the gradient diagnostic, when the recipe asks for it (after the engine exists)."""
        if self.cfg.grad_discrepancy_every:
            from lopd.train.diagnostic import GradientDiagnostic

            self.diagnostic = GradientDiagnostic(run, self.student)

    def minibatches(self, step: int) -> list[list[OpdSample]]:
        """Step ``step``'s global batch (a deterministic slice of the rollouts, by the global step,
        so Lightning rounds on the same rollouts would make exactly the uninterrupted run's
        batches), this rank's share of each PPO mini-batch."""
        t = self.cfg.train
        idx = global_batch_indices(len(self.samples), step, t.global_batch, t.seed)
        return split_minis([self.samples[i] for i in idx], self.cfg.mini_batches, self.run.rank, self.run.world)

    def before_step(self, step: int, minis: list[list[OpdSample]]) -> dict[str, float]:
        """Metrics measured at the weights before the update: the gradient diagnostic when due."""
        every = self.cfg.grad_discrepancy_every
        if self.diagnostic is None or step % every:
            return {}
        return self.diagnostic.measure(step, [s for m in minis for s in m])

    def close(self) -> None:
        if self.diagnostic is not None:
            self.diagnostic.close()
