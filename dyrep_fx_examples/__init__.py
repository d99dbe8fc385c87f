"""Example training and data code for dyrep_fx, kept apart from the compiler package.

* :mod:`dyrep_fx_examples.demo`: the main job (``dyrep-fx demo``, ``make demo``): plain vs DyRep vs DBB
  training of a small CNN on real Fashion-MNIST, and the recipes the benchmarks reuse.
* :mod:`dyrep_fx_examples.data`: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package.
* :mod:`dyrep_fx_examples.datasets`: offline detection, segmentation and classification folders for the
  OpenMMLab configs in ``mm_configs/cpu``.

Nothing in :mod:`dyrep_fx` imports this package except the command line's ``demo`` sub-command.
"""
