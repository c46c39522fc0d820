"""Dice of a network on whole preprocessed cases, with nnU-Net's own sliding window (no mirroring): what the shortcut
diagnostics of victims and the fresh-network probe of a protection run both measure."""
import numpy as np
import torch


def case_predictor(network, plans_manager, configuration_manager, dataset_json, trainer_name: str, device):
    """An nnUNetPredictor around a live network (as nnU-Net's own final validation builds one)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=False, device=device, verbose=False, allow_tqdm=False)
    predictor.manual_initialization(network, plans_manager, configuration_manager, None, dataset_json, trainer_name,
                                    None)
    return predictor


def dice_per_label(prediction: np.ndarray, reference: np.ndarray, labels) -> dict:
    """Dice of each label (None where it is absent from both)."""
    out = {}
    for label in labels:
        p, r = prediction == label, reference == label
        denominator = int(p.sum() + r.sum())
        out[int(label)] = None if denominator == 0 else float(2 * (p & r).sum() / denominator)
    return out


def mean_dice(per_case: list[dict]) -> float | None:
    values = [v for case in per_case for v in case.values() if v is not None]
    return float(np.mean(values)) if values else None


@torch.no_grad()
def predict_cases(predictor, cases) -> list[np.ndarray]:
    """The network's label map of each case ((data [C, ...], seg [1, ...]) on the preprocessed grid)."""
    return [predictor.predict_sliding_window_return_logits(torch.from_numpy(np.asarray(data, dtype=np.float32)))
            .argmax(0).cpu().numpy() for data, _ in cases]


def cases_dice(predictor, cases, labels) -> float | None:
    """Mean Dice over `cases` ((data [C, ...], seg [1, ...]) on the preprocessed grid) and labels."""
    return mean_dice([dice_per_label(p, np.asarray(seg)[0], labels)
                      for p, (_, seg) in zip(predict_cases(predictor, cases), cases)])
