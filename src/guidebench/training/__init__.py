"""Training loops for guidebench's own small models (the digits benchmark).

diffusion        eps-prediction DDPM with label dropout and EMA      (guidebench.training.diffusion)
noisy_classifier cross-entropy on noised images, t ~ U{0..T-1}       (guidebench.training.classifiers)
clean_classifier cross-entropy on clean images                       (guidebench.training.classifiers)
evalnet          the evaluation network, trained on the heldout split (guidebench.training.evalnet)
Each returns (module to save, metrics); `guidebench.cli.train` writes the checkpoint.
"""
