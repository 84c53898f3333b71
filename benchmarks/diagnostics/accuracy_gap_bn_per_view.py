# Diagnostic (issue 12 accuracy gap): SimCLR's backbone called once per view, as lightly's and solo-learn's
# loops do, so BatchNorm normalises each view's batch with its own statistics; fastssl concatenates the
# views into one (2B, ...) call, whose BN statistics mix both views of every image.
import sys

import torch

from fastssl import losses
from fastssl.methods import simclr as S
from fastssl.methods._common import embedding_std


def forward(self, views, step):
    b = views[0].shape[0]
    feats = torch.cat([self.backbone(v) for v in views[:2]])
    z = torch.cat([self.projector(f) for f in feats.split(b)])      # projector BN per view too
    z1, z2 = z[:b].float(), z[b:].float()
    loss = losses.nt_xent(z1, z2, temperature=self.temperature, decoupled=self.decoupled)
    return {"loss": loss, "features": feats[:b].detach(), "z_std": embedding_std(z1)}


S.SimCLR.forward = forward
import fastssl.train as T  # noqa: E402

sys.exit(T.main(['--config', 'configs/demo/simclr.yaml', 'train.out_dir=/tmp/acc/runs', 'train.resume=false',
                 'train.progress=false', 'eval.every_epochs=0'] + sys.argv[1:]))
