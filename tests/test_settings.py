import pytest

from car_backend.settings import Settings, SettingsError, settings_table


def test_defaults_match_the_architecture():
    s = Settings.from_env({})
    assert s.proposal_model == "ViT-B-16:openai"
    assert s.classifier_model == "ViT-L-14:openai"
    assert s.device == "auto" and s.preset == "coco" and s.output == "auto"
    assert s.redis_url == "" and s.predict_wait == 60.0 and s.port == 9090


def test_environment_values_are_typed():
    s = Settings.from_env({
        "CAR_PREDICT_WAIT": "12.5", "PORT": "9191", "CAR_ALLOWED_HOSTS": "a.example, b.example,",
        "LOG_LEVEL": "debug", "CAR_DEVICE": "cpu",
    })
    assert s.predict_wait == 12.5 and s.port == 9191
    assert s.allowed_hosts == ("a.example", "b.example")
    assert s.log_level == "DEBUG" and s.device == "cpu"


@pytest.mark.parametrize("env,needle", [
    ({"CAR_DEVICE": "gpu0"}, "CAR_DEVICE='gpu0' is not allowed; use one of: auto, cpu, cuda"),
    ({"CAR_PRESET": "cityscapes"}, "CAR_PRESET"),
    ({"CAR_OUTPUT": "mask"}, "brush, polygon, auto"),
    ({"PORT": "http"}, "PORT='http' is not a valid int"),
    ({"CAR_PREDICT_WAIT": "-1"}, "CAR_PREDICT_WAIT must not be negative"),
    ({"CAR_MAX_STEPS": "0"}, "CAR_MAX_STEPS must be a positive number"),
    ({"BASIC_AUTH_USER": "admin"}, "BASIC_AUTH_USER and BASIC_AUTH_PASS must be set together"),
    ({"LABEL_STUDIO_URL": "localhost:8080"}, "must start with http"),
])
def test_bad_values_name_the_variable_and_what_is_allowed(env, needle):
    with pytest.raises(SettingsError) as err:
        Settings.from_env(env)
    assert needle in str(err.value)


def test_secrets_never_appear_in_repr_or_redacted_form():
    s = Settings.from_env({"LABEL_STUDIO_API_KEY": "pat-secret-123", "BASIC_AUTH_USER": "u",
                           "BASIC_AUTH_PASS": "pw-secret-456"})
    assert s.label_studio_api_key == "pat-secret-123"
    for text in (repr(s), str(s), str(s.redacted())):
        assert "pat-secret-123" not in text and "pw-secret-456" not in text
    assert s.redacted()["basic_auth_user"] == "u"


def test_settings_table_covers_every_documented_variable():
    envs = {row[0] for row in settings_table()}
    documented = {"CAR_PROPOSAL_MODEL", "CAR_CLASSIFIER_MODEL", "CAR_DEVICE", "CAR_PRESET", "CAR_SAM_CHECKPOINT",
                  "CAR_OUTPUT", "REDIS_URL", "CAR_PREDICT_WAIT", "LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY",
                  "BASIC_AUTH_USER", "BASIC_AUTH_PASS", "CAR_ALLOWED_HOSTS", "CAR_MAX_IMAGE_PIXELS", "LOG_LEVEL",
                  "PORT"}
    assert documented <= envs


def test_readme_settings_table_is_current():
    from pathlib import Path

    from car_backend.settings import settings_markdown

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start, end = "<!-- settings-table:start -->\n", "<!-- settings-table:end -->"
    table = readme[readme.index(start) + len(start):readme.index(end)].strip()
    assert table == settings_markdown(), "regenerate the README table from car_backend.settings.settings_markdown()"
