"""transformers.Trainer interop: train with fastdistil's objectives (and teacher runtime) under the HF Trainer.

    from fastdistil.distill import Distiller, DistillationTrainer, build_recipe, load_model, student_from_teacher
    teacher = load_model("teacher-dir", role="teacher")
    student = student_from_teacher(teacher, [0, 2, 4])
    recipe = build_recipe("minilmv2", teacher, student)
    distiller = Distiller(teacher, student, recipe.objectives, plan=recipe.plan)
    trainer = DistillationTrainer(distiller=distiller, args=TrainingArguments("out", max_steps=1000, ...),
                                  train_dataset=ds, data_collator=DataCollatorWithPadding(tokenizer))
    trainer.train()
    trainer.save_model()          # the student as an HF directory (config.json + model.safetensors)

The Trainer owns the optimizer, schedule, gradient accumulation, mixed precision and distribution; its model is
`distiller.core` (the student plus the objectives' projections, so both are optimised). Each batch (a dict with
input_ids / attention_mask / token_type_ids, optional labels, and optional `index` = example indices for the
teacher cache) goes through `distiller(batch, step=trainer.state.global_step, model=model)`: the teacher runs on
the packed batch under inference mode, the plan's phase of that step applies (XtremeDistil's stages and freezing),
and the weighted loss is returned. Logged losses: `loss` (the Trainer's), plus each objective at logging steps.
"""
from __future__ import annotations

import os

import transformers

_COLUMNS = ["input_ids", "attention_mask", "token_type_ids", "labels", "index"]


class DistillationTrainer(transformers.Trainer):
    """A transformers.Trainer whose loss is a fastdistil Distiller's weighted objective.

    Args:
        distiller: a Distiller (its own optimizer and scheduler are not used: the Trainer builds its own from
            TrainingArguments over distiller.core's parameters).
        *args, **kwargs: as for transformers.Trainer (model= is not accepted: it is distiller.core).
    """

    def __init__(self, *args, distiller, **kwargs):
        if "model" in kwargs:
            raise TypeError("DistillationTrainer takes distiller=, not model= (the model is distiller.core)")
        self.distiller = distiller
        super().__init__(distiller.core, *args, **kwargs)
        self._last_parts: dict = {}

    def _set_signature_columns_if_needed(self):  # the core's forward is not a text model's signature
        if self._signature_columns is None:
            self._signature_columns = list(_COLUMNS)

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        inputs = {k: v for k, v in inputs.items() if k in _COLUMNS}
        out = self.distiller(inputs, step=self.state.global_step, model=model)
        self._last_parts = {k: float(v) for k, v in out.items() if k != "loss"}
        loss = out["loss"]  # a mean already: the Trainer's token-count rescaling does not apply
        return (loss, out) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs and self._last_parts:
            logs = {**logs, **{f"distill/{k}": v for k, v in self._last_parts.items()}}
        super().log(logs, *args, **kwargs)

    def _save(self, output_dir=None, state_dict=None):
        """Save the student (not the core with its projections) as an HF directory."""
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        self.distiller.student.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
