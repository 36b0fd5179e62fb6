"""The offline (Lightning OPD) rollout source: the fixed rollouts precompute published, read once.

It mirrors :class:`lopd.train.online.OnlineSource` (same attributes and methods), so the opd
stage reads the same in both modes: resolve the source, build the engine from its student,
attach it, take each step's mini-batches from it, publish its inputs and lineage.
"""

from __future__ import annotations

from lopd import stage
from lopd.layout import stage_prefix
from lopd.manifest import InputRef
from lopd.train.data import OpdSample, TrainDataError, global_batch_indices, load_opd_samples, open_precompute
from lopd.train.opd import split_minis


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
        prefix = (cfg.rollouts or stage_prefix(recipe.run_id, "precompute")).strip("/")
        m, sha = open_precompute(run.store, prefix, recipe.allow_inconsistent_teacher)
        ref = cfg.student or m.lineage.get("student") or run.store.url(stage_prefix(recipe.run_id, "sft"))
        student = stage.resolve_model(ref, "opd.student")
        sampled_by = m.lineage.get("student_fingerprint")
        if sampled_by is not None and sampled_by != student.fingerprint:
            raise TrainDataError(f"opd.student: {ref} (fingerprint {student.fingerprint}) is not the model that "
                                 f"sampled the precomputed rollouts ({sampled_by})")
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(student.path).vocab_size
        samples, skipped = load_opd_samples(run.store, prefix, m, cfg.train.max_seq_len, vocab)
        stage.log("data", stage=run.stage, rows=len(samples), skipped_too_long=skipped, uri=run.store.url(prefix))
        inputs = {"student": student.input_ref(),
                  "precompute": InputRef(uri=run.store.url(prefix), manifest_sha256=sha)}
        keep = ("teacher_fingerprint", "sft_teacher_fingerprint", "teacher_consistent", "allow_inconsistent_teacher")
        lineage = {**{k: m.lineage.get(k) for k in keep}, "student_fingerprint": student.fingerprint,
                   "mode": "offline"}
        return cls(run, student, samples, inputs, lineage, {"rows": len(samples), "skipped_too_long": skipped})

    def attach(self, run) -> None:
        """Start the gradient diagnostic, when the recipe asks for it (after the engine exists)."""
        if self.cfg.grad_discrepancy_every:
            from lopd.train.diagnostic import GradientDiagnostic

            self.diagnostic = GradientDiagnostic(run, self.student)

    def minibatches(self, step: int) -> list[list[OpdSample]]:
        """Step ``step``'s global batch (a deterministic slice of the rollouts), this rank's share
        of each PPO mini-batch."""
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
