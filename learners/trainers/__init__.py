"""The update of a TAO round, TRL-style: one config (`learner.*`, `taoflow.settings.LearnerSettings`) and one trainer
per algorithm, each over TRL with a PEFT LoRA: `grpo` (online GRPO), `rft` (rejection-sampling fine-tuning on the
verified best candidates), `dpo` (offline DPO on stored pairs); `common` holds what they share. Where training runs
(inline, or a child process that sees only the selected GPU) is `learners.training`.

Training continues the parent adapter (the one the gateway serves) when there is one, else a fresh LoRA on the base.
KL: GRPO's `beta` is `learner.kl_beta` (0.04; the installed TRL defaults to 0, which lets rounds drift without bound)
and the reference is the parent: for a PEFT model TRL computes reference log-probs with a frozen "ref" adapter copied
from the trainable one (with no adapter loaded, with adapters disabled, i.e. the base). `common.pin_reference` makes
that copy the parent's weights explicitly, which matters after RFT has already moved the trainable adapter. Only the
trained "default" adapter is saved: the "ref" copy is TRL's bookkeeping. Extra TRL settings (`learner.trl`) go into
whichever of TRL's config classes know them.
"""
