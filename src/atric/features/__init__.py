"""Audio experts behind one small interface (``AudioExpert``) plus a registry (``EXPERTS``).

expert = build_expert("aisfx", params.features.expert_settings("aisfx"), device)
sequences = expert.embed([waveform_at_expert_sample_rate, ...])   # one float32 [T, D] each
"""

from atric.features.base import EXPERTS, AudioExpert, build_expert

__all__ = ["EXPERTS", "AudioExpert", "build_expert"]
