"""Modules and model-level components: gradient reversal, binary and periodic layers, TrAct layers,
gradient modulation for multimodal fusion, PGI auxiliary branches, gradient-alignment penalties,
gradient-boosted layers, EvoNorm, LN placements,
reversible blocks and columns, 8-bit saved activations (Mesa), replayable dropout masks, hypernetworks."""
from .binary import BinaryConv2d, BinaryLinear, BinaryModule, binary_modules, set_estimator_param
from .evonorm import EvoNormB0, EvoNormS0, replace_bn_relu
from .gbnn import BoostedMLP, GradientBoostedMLP, switch_off_units
from .gradient_reversal import DomainClassifier, GradientReversal, domain_loss
from .hessian_alignment import HessianAlignment, hessian_gradient_product, hutchinson_diag, risk_variance
from .hypernetwork import HyperClient, HyperNetwork
from .maskable_dropout import MaskableDropout, convert_dropout, dropout_mode
from .mesa import MesaAttention, MesaLinear, mesa_convert, set_mesa_enabled
from .modulation import AGM, AGMController, GradientScale, grad_scale, shapley_outputs
from .periodic import BiPerConv2d, BiPerLinear, set_stage
from .peri_ln import ResidualNormBlock
from .pgi import CBFuse, CBLinear, DeepSupervision, PGIWrapper
from .rev_mbconv import MBConv3d, RevMBConv3d, RevMBConvUNet3d
from .revcol import RevColNet, ReversibleColumnStack
from .reversible import ReversibleBlock, ReversibleSequential, ReversibleStep
from .tract import TrActConv2d, TrActLinear, tract
from .icnn import ICNN, clamp_after_step
from .single_attention import SingleLayerAttention
from .late_fusion import LateFusionClassifier
from .deep_cg import DCDMNet2d
from .multigrid import MultigridConv1d, MultigridConv2d
from .fno import FNO2d, SpectralConv2d
from .hard_constraint_moe import HardConstraintMoE, fd_terms
from .kan import (KANLayer, PrunedKANLayer, SelectableKANLayer, ThreePhaseSchedule, kan_coefficient_count, prune_model,
                  three_phase_schedule)
from .kan_bases import basis_families, make_basis, register_basis
from .contrastive import info_nce_loss, spectral_contrastive_loss
from .projection_head import ProjectionHead, WithProjectionHead
from .field_binary import (FieldBinaryLinear, binary_perceptron_logH_loss, field_kl, field_mode, field_modules,
                           field_thetas, set_field_beta)
from .hard_negative_mixing import hard_negative_mix, queue_logits, queue_info_nce_loss, InfoNCEWithMixing
from .memory_queue import MemoryQueue, momentum_update
from .switch_moe import TimestepGatedMoEMask, DiffusionPriorLoss, diffusion_prior_matrix, match_prior_columns, jensen_shannon

from .sequential_deformation import CascadedFlow, LossRouting, compose_flows
__all__ = ["GradientReversal", "DomainClassifier", "domain_loss", "BinaryModule", "BinaryLinear", "BinaryConv2d",
           "binary_modules", "set_estimator_param", "BiPerLinear", "BiPerConv2d", "set_stage", "TrActLinear",
           "TrActConv2d", "tract", "AGM", "AGMController", "GradientScale", "grad_scale", "shapley_outputs",
           "PGIWrapper", "DeepSupervision", "CBLinear", "CBFuse", "HessianAlignment", "hessian_gradient_product",
           "hutchinson_diag", "risk_variance", "GradientBoostedMLP", "BoostedMLP", "switch_off_units",
           "EvoNormB0", "EvoNormS0", "replace_bn_relu", "ResidualNormBlock",
           "ReversibleBlock", "ReversibleSequential", "ReversibleStep", "ReversibleColumnStack", "RevColNet",
           "MesaLinear", "MesaAttention", "mesa_convert", "set_mesa_enabled",
           "MBConv3d", "RevMBConv3d", "RevMBConvUNet3d", "MaskableDropout", "convert_dropout",
           "dropout_mode", "HyperNetwork", "HyperClient", "ICNN", "clamp_after_step", "SingleLayerAttention", "LateFusionClassifier", "DCDMNet2d", "MultigridConv1d", "MultigridConv2d", "HardConstraintMoE", "fd_terms", "FieldBinaryLinear", "field_kl", "field_mode", "set_field_beta", "field_modules", "field_thetas", "binary_perceptron_logH_loss", "KANLayer", "SelectableKANLayer", "PrunedKANLayer", "ThreePhaseSchedule", "three_phase_schedule", "prune_model", "kan_coefficient_count", "make_basis", "register_basis", "basis_families", "ProjectionHead", "WithProjectionHead", "spectral_contrastive_loss", "info_nce_loss", "FNO2d", "SpectralConv2d", "hard_negative_mix", "queue_logits", "queue_info_nce_loss", "InfoNCEWithMixing", "MemoryQueue", "momentum_update", "TimestepGatedMoEMask", "DiffusionPriorLoss", "diffusion_prior_matrix", "match_prior_columns", "jensen_shannon", "CascadedFlow", "LossRouting", "compose_flows"]
