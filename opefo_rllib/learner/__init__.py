"""Learners: the DeepSpeed TorchLearner base and the policy export in Hugging Face format."""
