"""The YOLOv1 loss (paper Section 2.2, equation 3): sum-squared error over the S x S grid.

    lambda_coord * sum_resp [(x - x^)^2 + (y - y^)^2 + (sqrt w - sqrt w^)^2 + (sqrt h - sqrt h^)^2]
  +                sum_resp (C - C^)^2
  + lambda_noobj * sum_not_resp C^2
  +                sum_cells_with_object sum_classes (p(c) - p^(c))^2

summed over the batch and divided by the batch size (Darknet scales its gradient by
1 / batch). The network regresses sqrt(w), sqrt(h) directly (Darknet's ``sqrt=1``), so
only the target's square root is taken and zero-size predictions have finite gradients.

This is Darknet's detection layer (``forward_detection_layer``, cfg/yolov1.cfg: object_scale 1,
noobject_scale .5, class_scale 1, coord_scale 5, rescore=1, sqrt=1, softmax=0): same terms, same
responsible predictor (:meth:`YoloLoss.responsible`), checked against the C code in
tests/test_darknet_detection.py (docs/darknet-parity.md). Darknet does not compute this loss's
gradient but ``delta = scale * (truth - output)``, minus half of it: for a batch of N images,
``delta = -(N / 2) * d loss / d output``. Its printed cost is not equation 3 either but the sum
of the squared deltas (``mag_array``), e.g. 25 (x - x^)^2 for a coordinate.

Learning rates do not carry over from Darknet unchanged: besides that factor of 2 its GPU
connected layers clamp each delta to [-1, 1] (``constrain_gpu``). Here the gradient is the
exact one of equation 3, neither halved nor clamped: the same learning rate takes steps twice
as large as in Darknet, with nothing bounding them. :class:`DarknetUpdate`
(train.py ``--update darknet``) gives Darknet's halved and clamped gradient instead.
"""
from __future__ import annotations

import torch
from torch import nn

from utils import cell_to_image_boxes, elementwise_iou, split_predictions

COMPONENTS = ("coord", "obj", "noobj", "cls")


class YoloLoss(nn.Module):
    """``loss_fn(predictions, target)`` -> scalar; ``components=True`` also returns the terms.

    predictions: ``(N, S*S*(C+5B))`` or ``(N, S, S, C+5B)``.
    target: ``(N, S, S, C+5)``: one-hot class, objectness, x, y (cell), w, h (image).
    ``rescore=True`` trains the responsible predictor's confidence towards its IoU with
    the ground truth (paper, Darknet ``rescore=1``); ``False`` towards 1 (popular tutorial).
    """

    def __init__(self, S: int = 7, B: int = 2, C: int = 20, lambda_coord: float = 5.0,
                 lambda_noobj: float = 0.5, rescore: bool = True):
        super().__init__()
        self.S, self.B, self.C = S, B, C
        self.lambda_coord, self.lambda_noobj, self.rescore = lambda_coord, lambda_noobj, rescore

    def responsible(self, box_pred: torch.Tensor, target: torch.Tensor):
        """Which predictor answers for each object, and its IoU with the object.

        Darknet's rule (``forward_detection_layer``): the predictor whose decoded box
        (image coordinates, w and h squared) has the highest IoU with the ground truth;
        when no predictor of the cell overlaps it (every IoU 0), the one whose box is
        closest to it, by the root mean square of the differences of ``cx, cy, w, h``
        (``box_rmse``). Ties go to the first predictor in both cases (Darknet's strict
        ``>`` / ``<``; ``argmax`` returns the first maximum). Darknet only takes an RMSE
        below 20 (otherwise it indexes predictor -1); no box of a trained network is that
        far off, and here the closest one is always taken. Returns a ``(N, S, S, B)``
        mask and the IoUs.
        """
        C, S = self.C, self.S
        with torch.no_grad():
            pred_wh = box_pred[..., 3:5].square()
            truth_xy, truth_wh = target[..., None, C + 1:C + 3], target[..., None, C + 3:C + 5]
            boxes = cell_to_image_boxes(box_pred[..., 1:3], pred_wh)
            iou = elementwise_iou(boxes, cell_to_image_boxes(truth_xy, truth_wh))  # (N,S,S,B)
            # squared distance (same order as the RMSE); centres in image units: cell / S
            dist = ((box_pred[..., 1:3] - truth_xy) / S).square().sum(-1) + (pred_wh - truth_wh).square().sum(-1)
            overlaps = iou.amax(-1, keepdim=True) > 0
            best = torch.where(overlaps, iou, -dist).argmax(-1)
            best = nn.functional.one_hot(best, self.B).to(iou.dtype)
        return best * target[..., C:C + 1], iou

    def forward(self, predictions: torch.Tensor, target: torch.Tensor, components: bool = False):
        S, B, C = self.S, self.B, self.C
        cls_pred, box_pred = split_predictions(predictions, S, B, C)
        cls_pred, box_pred, target = cls_pred.float(), box_pred.float(), target.float()
        resp, iou = self.responsible(box_pred, target)
        obj = target[..., C]
        conf = box_pred[..., 0]

        xy_err = (box_pred[..., 1:3] - target[..., None, C + 1:C + 3]).square().sum(-1)
        wh_err = (box_pred[..., 3:5] - target[..., None, C + 3:C + 5].sqrt()).square().sum(-1)
        conf_target = iou if self.rescore else torch.ones_like(iou)

        terms = {
            "coord": self.lambda_coord * (resp * (xy_err + wh_err)).sum(),
            "obj": (resp * (conf - conf_target).square()).sum(),
            "noobj": self.lambda_noobj * ((1 - resp) * conf.square()).sum(),
            "cls": (obj * (cls_pred - target[..., :C]).square().sum(-1)).sum(),
        }
        n = predictions.shape[0]
        terms = {k: v / n for k, v in terms.items()}
        total = sum(terms.values())
        return (total, terms) if components else total


class DarknetUpdate(nn.Module):
    """Darknet's training update around a :class:`YoloLoss` (train.py ``--update darknet``).

    Darknet's detection layer (``forward_detection_layer``, detection_layer.c) writes
    ``delta = scale * (truth - output)`` for each output of each image: minus *half* the
    gradient of equation 3. ``backward_detection_layer`` adds it to the connected layer's
    delta, and on the GPU ``backward_connected_layer_gpu`` (connected_layer.c) first clamps
    that delta to [-1, 1] (``constrain_gpu``, blas_kernels.cu); the CPU path does not clamp.
    The weight gradients are then summed over the batch and the update divides by the batch
    (``update_connected_layer``), so the bound is per image.

    Here the gradient reaching the network's output is exactly that: per image, half the
    gradient of equation 3 clamped to [-bound, bound], then the batch mean, as the plain
    loss's gradient is a batch mean. It is imposed by a surrogate whose gradient is that
    tensor, rather than by a hook on the output's gradient: the gradient reaching a hook is
    also multiplied by the mixed-precision loss scale and 1 / --accum-steps, which would move
    the bound. The value returned (and logged) is still equation 3's loss.
    """

    def __init__(self, loss: YoloLoss, scale: float = 0.5, bound: float = 1.0):
        super().__init__()
        self.loss, self.scale, self.bound = loss, scale, bound

    def forward(self, predictions: torch.Tensor, target: torch.Tensor, components: bool = False):
        leaf = predictions.detach().requires_grad_()
        with torch.enable_grad():
            total, terms = self.loss(leaf, target, components=True)
            (grad,) = torch.autograd.grad(total, leaf)
        n = predictions.shape[0]  # total is a batch mean: n * grad is each image's own gradient
        delta = (self.scale * n * grad.float()).clamp(-self.bound, self.bound) / n
        surrogate = (predictions.float() * delta).sum()
        total = total.detach() + (surrogate - surrogate.detach())
        return (total, {k: v.detach() for k, v in terms.items()}) if components else total
