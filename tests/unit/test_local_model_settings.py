"""The embedded local model's settings: greedy decoding unless the temperature is set, since
sampling makes a 135M model drift from the document it should copy from."""

from __future__ import annotations

from service.core.settings import LLMSettings, Settings
from service.devtools.embedded import with_local_model


def test_the_local_model_decodes_greedily_by_default() -> None:
    assert Settings().llm.temperature > 0  # what another model gets
    assert with_local_model(Settings()).llm.temperature == 0


def test_a_temperature_set_for_the_local_model_is_kept() -> None:
    settings = Settings(llm=LLMSettings(temperature=0.4))
    assert with_local_model(settings).llm.temperature == 0.4
