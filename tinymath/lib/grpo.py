"""GRPO: reinforcement learning from the model's own solutions with a verifiable reward
(``tinymath train --method grpo``), on the same training recipe as SFT (`tinymath.lib.trainer`).

Each step takes ``--batch-size`` questions, samples ``--samples`` solutions to each with the
current policy (tinymath's batched generation), rewards a solution 1 when its ``#### N`` answer is
right (the strict GSM8K check; plus ``--format-reward`` for giving a ``#### N`` at all), and
trains on the solutions with their group-relative advantages. The choices, and where they come
from:

- advantage = reward - mean reward of the question's group, not divided by the group's standard
  deviation (Dr. GRPO, Liu et al. 2025: the division over-weights questions that are almost always
  or almost never solved); groups whose solutions all earn the same reward teach nothing and are
  not run through the model (DAPO's dynamic sampling, Yu et al. 2025, without re-sampling);
- token-level normalisation: the step's loss is the sum over the solution tokens of the groups
  that teach something of -advantage x log-probability, divided by the number of those tokens
  (DAPO's loss after its dynamic-sampling filter; TRL's ``dapo`` loss), so long solutions are not
  down-weighted per token, and a step whose groups are mostly unanimous takes as large an update
  as any other;
- the loss's log-probabilities are those of the distribution the solutions were sampled from,
  the logits divided by ``--temperature`` (as TRL's ``GRPOTrainer`` computes them; sampling's
  top-k cut of the tail aside), so sampling below 1.0 is still on-policy rather than a push
  towards the sharper distribution's own choices;
- on-policy: one update per batch of samples, so the probability ratio of PPO/GRPO is 1 and its
  clipping never acts (DeepSeekMath's GRPO with one inner iteration; nanochat's ``chat_rl.py``);
- no KL penalty to the reference model (TRL's default ``beta=0``; DAPO and Dr. GRPO drop it):
  the LoRA adapter and a small learning rate keep the policy near its start.

A solution is the token ids the policy sampled, up to and including its EOS. Sampling runs on
`PolicyCopy`: a plain 16-bit copy of the policy (the quantized base dequantized, the adapter
merged in again after every update), so generation runs at ``eval``'s speed rather than through
the training model's 4-bit weights and separate LoRA matmuls: on a GPU with a static KV cache and
decode steps replayed from a CUDA graph (`tinymath.lib.decode`; nothing to compile unless
``--compile-steps`` compiles each step first; with ``--calculator`` the calculator's results
written into the rows as they decode). Validation answers come from the same copy.
"""

from __future__ import annotations

import time

from tinymath.base.errors import TinymathError
from tinymath.base.prompts import extract_answer, is_correct
from tinymath.lib.batching import count_label_tokens, micro_batches
from tinymath.lib.generate import (
    generated_ids as solution_ids,  # a solution: what the policy generated
)
from tinymath.lib.trainer import Trainer, validation_accuracy


def reward(completion: str, gold: str, format_reward: float = 0.0) -> float:
    """1 for the right final answer after ``####`` (strict), plus ``format_reward`` for any ``#### N``."""
    answered = extract_answer(completion, strict=True) is not None
    return float(is_correct(completion, gold, strict=True)) + (format_reward if answered else 0.0)


def group_advantages(rewards: list[float], group: int) -> list[float]:
    """Each reward minus the mean reward of its group (consecutive runs of ``group`` samples)."""
    out = []
    for start in range(0, len(rewards), group):
        chunk = rewards[start:start + group]
        mean = sum(chunk) / len(chunk)
        out += [r - mean for r in chunk] if teaches(chunk) else [0.0] * len(chunk)  # exactly 0, not float noise
    return out


def teaches(group_rewards: list[float]) -> bool:
    """Whether a group's solutions teach anything: their rewards differ (a unanimous group does not)."""
    return max(group_rewards) - min(group_rewards) >= 1e-9


class PolicyCopy:
    """The policy as a plain model for sampling: the training model's base weights (NF4
    dequantized: the weights the adapter trains against) plus the adapter's current update,
    merged. `sync` merges the adapter again after an optimizer step (a matmul per layer)."""

    def __init__(self, peft_model, source: str, dtype, device: str, trust_remote_code: bool = False):
        import torch
        from peft.tuners.lora import LoraLayer
        from peft.utils.integrations import dequantize_module_weight

        from tinymath.lib.attention import use_decode_attention
        from tinymath.lib.model import load_base_model

        self.model = load_base_model(source, quant="none", dtype=dtype, device=device,
                                     trust_remote_code=trust_remote_code).eval()
        use_decode_attention(self.model)
        plain = dict(self.model.named_modules())
        self.merged = []  # (linear of the copy, LoRA layer of the policy, base weight)
        with torch.no_grad():
            for name, module in peft_model.get_base_model().named_modules():
                target = plain.get(name)
                if target is None or not isinstance(getattr(target, "weight", None), torch.Tensor):
                    continue
                if isinstance(module, LoraLayer):
                    weight = dequantize_module_weight(module.get_base_layer())  # plain weights pass through
                    self.merged.append((target, module, weight.to(dtype).clone()))
                elif type(module).__name__ == "Linear4bit":  # quantized, no adapter: its dequantized weights
                    target.weight.copy_(dequantize_module_weight(module).to(dtype))
        self.sync()

    def sync(self) -> None:
        import torch

        with torch.no_grad():
            for target, lora, base in self.merged:
                target.weight.copy_(base + lora.get_delta_weight("default").to(base.dtype))


class GRPOTrainer(Trainer):
    """Trains on the policy's own sampled solutions; setup, checkpoints, logging, validation and the
    packed forward/backward are the SFT trainer's."""

    method = "grpo"
    prefetch = False  # a step's samples come from the policy after the previous update

    @property
    def loss_temperature(self) -> float:
        return self.config.temperature

    def _load_data(self) -> None:
        super()._load_data()
        if self.config.init_adapter:
            self._check_init_tokenizer()

    def _check_init_tokenizer(self) -> None:
        from tinymath.lib.model import load_tokenizer

        theirs = load_tokenizer(self.config.init_adapter, self.config.trust_remote_code, run=True)
        if len(theirs) != len(self.tokenizer) or theirs.eos_token != self.tokenizer.eos_token:
            raise TinymathError(f"--init-adapter {self.config.init_adapter} was trained with another tokenizer "
                                f"({len(theirs)} tokens, EOS {theirs.eos_token!r}) than --model {self.config.model} "
                                f"has ({len(self.tokenizer)}, {self.tokenizer.eos_token!r})")

    def _load_model(self) -> None:
        super()._load_model()
        if self.config.init_adapter:
            from peft import set_peft_model_state_dict

            from tinymath.base.files import load_safetensors
            from tinymath.base.runs import ADAPTER_WEIGHTS, load_run

            run = load_run(self.config.init_adapter)
            set_peft_model_state_dict(self.model, load_safetensors(run.path / ADAPTER_WEIGHTS))
        # the sampling copy, before memory is planned: the micro-batch size leaves room for it
        self.policy = PolicyCopy(self.model, self.config.model, self.dtype, self.device, self.config.trust_remote_code)
        if self.config.compile_steps:
            from tinymath.lib.generate import GenerationSettings, check_compile_steps

            check_compile_steps(GenerationSettings(compile_steps=True), self.policy.model, self.config.model)

    def _plan_graphs(self) -> None:
        self.plan.cuda_graphs = False  # the token weights vary per step; graphs replay fixed inputs only

    def step_batches(self, step: int) -> tuple[list[dict], int, list[dict]]:
        """Sample solutions to this step's questions, reward them and turn them into weighted
        training examples. The normaliser is the solution tokens of the groups that teach."""
        questions = self.step_examples(step)
        local = questions[self.accelerator.process_index::self.plan.world]
        started = time.time()
        examples, rewards = self.rollout(local)
        generation_s = time.time() - started
        teaching = [ex for ex in examples if ex["teaches"]]  # a zero advantage in a mixed group counts too
        counts = [count_label_tokens(examples), count_label_tokens(teaching), sum(rewards), len(rewards),
                  self._groups_solved(rewards)]
        generated, step_tokens, reward_sum, n, solved = self._sum_over_processes(counts)
        self.step_metrics = {"reward": round(reward_sum / max(n, 1), 4),
                             "groups_solved": round(solved / max(len(questions), 1), 4),
                             "generated_tokens": int(generated), "learning_tokens": int(step_tokens),
                             "generation_s": round(generation_s, 2)}
        # unanimous groups teach nothing: skipped, except under several processes, where every rank
        # must run the same number of backward passes (DDP reduces gradients in each)
        learning = teaching if self.plan.world == 1 else examples
        return examples, max(int(step_tokens), 1), list(micro_batches(learning, self.config, self.pad_id,
                                                                       self.plan.micro_batch_tokens))

    def rollout(self, questions: list[dict]) -> tuple[list[dict], list[float]]:
        """``--samples`` solutions per question from the current policy, as training examples whose
        ``weights`` are the solution's advantage on its tokens (``teaches``: its group's rewards
        differ); and the rewards."""
        from tinymath.lib.generate import GenerationSettings
        from tinymath.lib.scoring import default_prompts

        config, k = self.config, self.config.samples
        prompts = default_prompts(self.tokenizer, questions, self.data_settings["format"],
                                  self.data_settings["system_prompt"])
        flat = [p for p in prompts for _ in range(k)]
        settings = GenerationSettings(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                      static_cache=self._static_cache, compile_steps=config.compile_steps,
                                      min_width=self._prompt_width())
        self.policy.sync()
        solutions, texts = self.sample(flat, settings)
        rewards = [reward(text, questions[i // k]["answer"], config.format_reward) for i, text in enumerate(texts)]
        mixed = [teaches(rewards[g:g + k]) for g in range(0, len(rewards), k) for _ in range(k)]
        examples = [{"input_ids": prompt + sol, "labels": [-100] * len(prompt) + sol,
                     "weights": [0.0] * len(prompt) + [advantage] * len(sol), "teaches": teach}
                    for prompt, sol, advantage, teach in zip(flat, solutions, group_advantages(rewards, k), mixed)
                    if sol]
        return examples, rewards

    def _prompt_width(self) -> int:
        """With --compile-steps, the longest prompt of the training questions: every step's batch is
        padded to it, so the decode step is compiled once, not once per width that a step's
        questions happen to need. 0 otherwise (each batch as wide as its own prompts)."""
        if not self.config.compile_steps:
            return 0
        if getattr(self, "_width", None) is None:
            from tinymath.lib.scoring import default_prompts

            prompts = default_prompts(self.tokenizer, self.train_examples, self.data_settings["format"],
                                      self.data_settings["system_prompt"])
            self._width = max(len(p) for p in prompts)
        return self._width

    def sample(self, prompts: list[list[int]], settings) -> tuple[list[list[int]], list[str]]:
        """Each prompt's solution: its token ids and its text. With ``--calculator`` the calculator's
        results are in the solution (as ``eval --calculator`` answers), written in as it decodes
        (tinymath's decode loop) or between rounds of ``generate`` (`calculator_rounds`): either way
        the ids are the tokens the policy read, its own and the calculator's."""
        from dataclasses import replace

        from tinymath.lib.generate import (
            InferenceModel,
            _decode_new,
            calculator_rounds,
            decodes_own,
            generate_ids,
        )

        tokenizer = self.tokenizer
        inference = InferenceModel(self.policy.model, tokenizer, self.data_settings["format"],
                                   self.data_settings["system_prompt"], {})
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        settings = replace(settings, calculator=self.config.calculator)
        if settings.calculator and not decodes_own(self.policy.model, settings, len(prompts)):
            ids = calculator_rounds(inference, prompts, settings)
            return ids, [tokenizer.decode(row, skip_special_tokens=True) for row in ids]
        generated = generate_ids(inference, prompts, settings)
        return ([solution_ids(row.tolist(), eos, pad) for row in generated],
                [_decode_new(tokenizer, row)[0] for row in generated])

    def before_steps(self) -> None:
        """With ``--eval-every``, validate the starting adapter first (step 0): ``--keep best`` then
        never keeps an adapter that does worse on the held-out problems than the one the run
        started from."""
        if not self.val_rows or self.state.start_step or not self.is_main:
            return
        self.update(advance=0, description="validating the starting adapter")
        record = {"step": 0, "epoch": 0.0, "val_accuracy": self.validation_accuracy()}
        self.note_accuracy(record["val_accuracy"], 0)
        self.log_record(record)

    def validation_accuracy(self) -> float:
        """Greedy accuracy on the held-out rows, answered by the sampling copy (the same weights), with
        the calculator when the solutions are sampled with it."""
        self.policy.sync()
        return validation_accuracy(self.policy.model, self.tokenizer, self.val_rows, self.data_settings["format"],
                                   self.data_settings["system_prompt"], calculator=self.config.calculator,
                                   static_cache=self._static_cache)

    @property
    def _static_cache(self) -> bool | None:
        """Fast (static-cache) decoding for sampling and validation: where it pays, unless --no-compile."""
        return False if self.config.compile is False else None

    def _groups_solved(self, rewards: list[float]) -> int:
        k = self.config.samples
        right = 1 + self.config.format_reward - 1e-9  # a right answer also earns the format reward
        return sum(any(r >= right for r in rewards[i:i + k]) for i in range(0, len(rewards), k))

    def _sum_over_processes(self, values: list[float]) -> list[float]:
        if self.plan.world == 1:
            return values
        import torch

        totals = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        return self.accelerator.reduce(totals, reduction="sum").tolist()

    def summary(self) -> dict:
        """The SFT summary, plus the samples' mean reward over the run's first and last ten steps
        (fewer in a run of under 20, so the two do not overlap) and the number of steps that learned
        anything (a question whose samples differed in reward); from metrics.jsonl, so a resumed
        run counts its earlier steps too."""
        from tinymath.base.runs import read_metrics

        summary = super().summary()
        if self.is_main:
            rows = read_metrics(self.out)
            summary["learning_steps"] = sum(row.get("learning_tokens", 0) > 0 for row in rows)
            rewards = [row["reward"] for row in rows if "reward" in row]
            if rewards:
                n = max(1, min(10, len(rewards) // 2))
                first, last = rewards[:n], rewards[-n:]
                summary.update(reward_first_steps=round(sum(first) / n, 4), reward_last_steps=round(sum(last) / n, 4),
                               reward_window_steps=n)
        return summary

    def after_step(self, done: int, loss: float, lr: float, real: int, tps: float, stop_votes: float) -> None:
        """Adds the update's seconds; tokens/s counts sampling and update together."""
        update_s = time.time() - self.step_started
        self.step_metrics["update_s"] = round(update_s, 2)
        tps = real / max(update_s + self.step_metrics.get("generation_s", 0.0), 1e-9)
        super().after_step(done, loss, lr, real, tps, stop_votes)


# the training methods: ``--method`` name -> the trainer that runs it
METHODS = {"sft": Trainer, "grpo": GRPOTrainer}
