# RepVGG-A0 on ImageNet-1k (mmpretrain's shipped config, unchanged: 120 epochs of cosine decay) + DyRep on the
# backbone: DyRep composed with mmpretrain's own re-parameterization.
#
# Compose, not refuse: a RepVGG block trains three branches (3x3 conv + BN, 1x1 conv + BN, identity BN) that
# mmpretrain's switch_to_deploy() sums into one 3x3 conv. dyrep_fx sees the block's convs as ordinary sites:
# DyRep grows branches (1x1-then-3x3, average pooling, ...) onto the 3x3 conv (and the 1x1 conv where a kind
# fits), and its fold turns each grown conv back into the conv it was, so dyrep_deploy.pth is a RepVGG in
# training form again: it loads with strict=True into mmpretrain's repvgg-A0_8xb32_in1k.py, and
# mmpretrain's reparameterization then fuses it as usual (both steps are exact sums of linear branches;
# tests/mm/test_mm_pretrain.py checks the outputs through both). Growth can only add what RepVGG's own
# branches lack; the 1x1 branch DyRep would add to a 3x3 conv duplicates RepVGG's and costs nothing at
# deploy time either way.
#
# Train (ImageNet under data/imagenet/):
#     torchrun --nproc_per_node 8 -m dyrep_fx.cli train mm_configs/mmpretrain/repvgg-A0_8xb32_in1k_dyrep.py --launcher pytorch
# Then the deploy-time RepVGG: build repvgg-A0_8xb32_in1k.py, load work_dir/dyrep_deploy.pth, call
# model.backbone.switch_to_deploy() (or mmpretrain's reparameterization tool on a checkpoint
# {'state_dict': ...}) and use repvgg-A0_deploy_in1k.py's model.
_base_ = ['mmpretrain::repvgg/repvgg-A0_8xb32_in1k.py']

custom_imports = dict(imports=['dyrep_fx.mm'], allow_failed_imports=False)
# DyRep's schedule matches this one: every 5 of 120 epochs until epoch 100.
custom_hooks = [
    dict(type='DyRepHook', targets=['backbone'], by_epoch=True,
         dyrep=dict(interval=5, until=100, topk=1, mode='online')),
]
