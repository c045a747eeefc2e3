"""TAO learner: rounds, rewards, ACT-R maths and the scheduler."""
