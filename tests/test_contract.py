"""The Start Training contract: defaults by version, expert mode, ranges, types, the warmup null rule,
checkpoint steps, preconditions and the response body. Expected values are written out, not computed."""

from __future__ import annotations

import pytest

from tailoredgen_train import errors as E
from tailoredgen_train.contract import (
    DatasetRecord,
    ModelRecord,
    TrainingParameters,
    build_response,
    canonical_version,
    check_can_start,
    planned_checkpoint_steps,
    resolve_training_parameters,
)

FIELDS = ("lr_scheduler", "learning_rate", "total_training_steps", "rank", "checkpoint_interval", "lr_warmup_steps")
SPELLINGS = ("fibo", "max", "light", "3.2", "bria-3.2", "2.3", "bria-2.3")
FIBO_SPELLINGS = ("fibo",)
LEGACY_SPELLINGS = ("max", "light", "3.2", "bria-3.2", "2.3", "bria-2.3")
NON_WARMUP_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant")

FIBO_DEFAULT = TrainingParameters(
    learning_rate=1e-4, lr_scheduler="constant_with_warmup", rank=128,
    total_training_steps=750, checkpoint_interval=500, lr_warmup_steps=100,
)
LEGACY_DEFAULT = TrainingParameters(
    learning_rate=1e-4, lr_scheduler="constant", rank=128,
    total_training_steps=1500, checkpoint_interval=500, lr_warmup_steps=None,
)

# One given value per field, the same for every version.
GIVEN = {
    "lr_scheduler": "linear",
    "learning_rate": 5e-4,
    "total_training_steps": 2000,
    "rank": 16,
    "checkpoint_interval": 250,
    "lr_warmup_steps": 50,
}

# (family, field given or None for "nothing given") -> the expected result, written out in full.
EXPECTED = {
    ("fibo", None): FIBO_DEFAULT,
    ("fibo", "lr_scheduler"): TrainingParameters(1e-4, "linear", 128, 750, 500, None),
    ("fibo", "learning_rate"): TrainingParameters(5e-4, "constant_with_warmup", 128, 750, 500, 100),
    ("fibo", "total_training_steps"): TrainingParameters(1e-4, "constant_with_warmup", 128, 2000, 500, 100),
    ("fibo", "rank"): TrainingParameters(1e-4, "constant_with_warmup", 16, 750, 500, 100),
    ("fibo", "checkpoint_interval"): TrainingParameters(1e-4, "constant_with_warmup", 128, 750, 250, 100),
    ("fibo", "lr_warmup_steps"): TrainingParameters(1e-4, "constant_with_warmup", 128, 750, 500, 50),
    ("legacy", None): LEGACY_DEFAULT,
    ("legacy", "lr_scheduler"): TrainingParameters(1e-4, "linear", 128, 1500, 500, None),
    ("legacy", "learning_rate"): TrainingParameters(5e-4, "constant", 128, 1500, 500, None),
    ("legacy", "total_training_steps"): TrainingParameters(1e-4, "constant", 128, 2000, 500, None),
    ("legacy", "rank"): TrainingParameters(1e-4, "constant", 16, 1500, 500, None),
    ("legacy", "checkpoint_interval"): TrainingParameters(1e-4, "constant", 128, 1500, 250, None),
    # warmup is relevant only for constant_with_warmup: the legacy default scheduler reports null
    ("legacy", "lr_warmup_steps"): TrainingParameters(1e-4, "constant", 128, 1500, 500, None),
}


def family(version: str) -> str:
    return "fibo" if version in FIBO_SPELLINGS else "legacy"


def resolve(request=None, version: str = "fibo", mode: str = "expert") -> TrainingParameters:
    return resolve_training_parameters(version, mode, request)


def invalid(request, version: str = "fibo") -> E.InvalidParameterError:
    with pytest.raises(E.InvalidParameterError) as info:
        resolve(request, version)
    return info.value


# ---- defaults by version, each field given or omitted ---------------------------------------------


@pytest.mark.parametrize("version", SPELLINGS)
@pytest.mark.parametrize("given_field", [None, *FIELDS])
def test_each_field_given_or_omitted_for_every_version(version, given_field):
    request = {} if given_field is None else {given_field: GIVEN[given_field]}
    assert resolve(request, version) == EXPECTED[(family(version), given_field)]


@pytest.mark.parametrize("version", SPELLINGS)
def test_all_six_fields_given_are_used_as_given(version):
    request = dict(GIVEN, lr_scheduler="constant_with_warmup")
    assert resolve(request, version) == TrainingParameters(5e-4, "constant_with_warmup", 16, 2000, 250, 50)


@pytest.mark.parametrize("version", SPELLINGS)
def test_fields_given_as_null_count_as_omitted(version):
    request = {name: None for name in FIELDS}
    assert resolve(request, version) == EXPECTED[(family(version), None)]


@pytest.mark.parametrize("request_body", [None, {}])
def test_empty_or_missing_body_gives_defaults(request_body):
    assert resolve(request_body, "fibo") == FIBO_DEFAULT
    assert resolve(request_body, "max") == LEGACY_DEFAULT


# ---- expert vs fully_automated ---------------------------------------------------------------------


@pytest.mark.parametrize("version", SPELLINGS)
@pytest.mark.parametrize("request_body", [None, {}, {name: None for name in FIELDS}])
def test_fully_automated_without_fields_resolves_to_defaults(version, request_body):
    assert resolve(request_body, version, "fully_automated") == EXPECTED[(family(version), None)]


@pytest.mark.parametrize("version", ("fibo", "3.2"))
@pytest.mark.parametrize("field_name", FIELDS)
def test_fully_automated_with_any_field_requires_expert_mode(version, field_name):
    with pytest.raises(E.ExpertModeRequiredError) as info:
        resolve({field_name: GIVEN[field_name]}, version, "fully_automated")
    err = info.value
    assert "only supported when training_mode is set to 'expert'" in err.message
    assert field_name in err.message
    assert err.fields == [field_name]
    assert err.http_status == 400
    assert err.code == "expert_mode_required"


def test_fully_automated_with_default_values_still_requires_expert_mode():
    # even sending exactly the defaults is "advanced parameters"
    with pytest.raises(E.ExpertModeRequiredError):
        resolve({"rank": 128}, "fibo", "fully_automated")


def test_unknown_training_mode_is_invalid_parameter():
    with pytest.raises(E.InvalidParameterError) as info:
        resolve({}, "fibo", "manual")
    assert info.value.errors[0].field_name == "training_mode"
    assert info.value.errors[0].field_input == "manual"


# ---- range edges -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field_name, value, expected",
    [
        ("learning_rate", 1e-6, TrainingParameters(1e-6, "constant_with_warmup", 128, 750, 500, 100)),
        ("learning_rate", 1e-3, TrainingParameters(1e-3, "constant_with_warmup", 128, 750, 500, 100)),
        ("total_training_steps", 1, TrainingParameters(1e-4, "constant_with_warmup", 128, 1, 1, 100)),
        ("total_training_steps", 5000, TrainingParameters(1e-4, "constant_with_warmup", 128, 5000, 500, 100)),
        ("rank", 4, TrainingParameters(1e-4, "constant_with_warmup", 4, 750, 500, 100)),
        ("rank", 256, TrainingParameters(1e-4, "constant_with_warmup", 256, 750, 500, 100)),
        ("checkpoint_interval", 100, TrainingParameters(1e-4, "constant_with_warmup", 128, 750, 100, 100)),
        ("checkpoint_interval", 750, TrainingParameters(1e-4, "constant_with_warmup", 128, 750, 750, 100)),
        ("lr_warmup_steps", 0, TrainingParameters(1e-4, "constant_with_warmup", 128, 750, 500, 0)),
        ("lr_warmup_steps", 1000, TrainingParameters(1e-4, "constant_with_warmup", 128, 750, 500, 1000)),
    ],
)
def test_range_edges_are_accepted(field_name, value, expected):
    assert resolve({field_name: value}) == expected


def test_checkpoint_interval_equal_to_given_total_is_accepted():
    assert resolve({"total_training_steps": 100, "checkpoint_interval": 100}) == TrainingParameters(
        1e-4, "constant_with_warmup", 128, 100, 100, 100
    )


@pytest.mark.parametrize(
    "field_name, value, msg",
    [
        ("learning_rate", 9.9e-7, "Input should be greater than or equal to 1e-06"),
        ("learning_rate", 1.0001e-3, "Input should be less than or equal to 0.001"),
        ("learning_rate", 0.0, "Input should be greater than or equal to 1e-06"),
        ("learning_rate", -1e-4, "Input should be greater than or equal to 1e-06"),
        ("total_training_steps", 0, "Input should be greater than or equal to 1"),
        ("total_training_steps", 5001, "Input should be less than or equal to 5000"),
        ("total_training_steps", 1000000, "Input should be less than or equal to 5000"),
        ("rank", 3, "Input should be greater than or equal to 4"),
        ("rank", 257, "Input should be less than or equal to 256"),
        ("checkpoint_interval", 99, "Input should be greater than or equal to 100"),
        ("lr_warmup_steps", -1, "Input should be greater than or equal to 0"),
        ("lr_warmup_steps", 1001, "Input should be less than or equal to 1000"),
    ],
)
def test_values_just_outside_the_range_are_refused(field_name, value, msg):
    err = invalid({field_name: value})
    assert err.errors == [E.FieldError(msg=msg, field_name=field_name, field_input=str(value))]
    assert err.http_status == 400
    assert err.code == "invalid_parameter"
    assert err.to_dict()["errors"] == [{"msg": msg, "field_name": field_name, "field_input": str(value)}]


def test_error_body_matches_bria_example():
    err = invalid({"total_training_steps": 1000000})
    body = err.to_dict()
    assert body["errors"] == [
        {"msg": "Input should be less than or equal to 5000", "field_name": "total_training_steps",
         "field_input": "1000000"}
    ]
    assert body["code"] == "invalid_parameter"


@pytest.mark.parametrize(
    "request_body, total",
    [
        ({"checkpoint_interval": 751}, 750),  # interval above the default total
        ({"checkpoint_interval": 600, "total_training_steps": 599}, 599),
        ({"checkpoint_interval": 100, "total_training_steps": 99}, 99),
    ],
)
def test_given_checkpoint_interval_above_total_steps_is_refused(request_body, total):
    err = invalid(request_body)
    assert [e.field_name for e in err.errors] == ["checkpoint_interval"]
    assert err.errors[0].field_input == str(request_body["checkpoint_interval"])
    assert err.errors[0].msg == f"Input should be less than or equal to total_training_steps ({total})"


@pytest.mark.parametrize("version", ("max", "bria-2.3"))
def test_given_checkpoint_interval_above_legacy_default_total_is_refused(version):
    err = invalid({"checkpoint_interval": 1501}, version)
    assert [e.field_name for e in err.errors] == ["checkpoint_interval"]


# ---- types ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field_name, value",
    [
        ("rank", "128"),
        ("rank", 12.5),
        ("rank", True),
        ("rank", {"value": 128}),
        ("total_training_steps", False),
        ("total_training_steps", float("inf")),
        ("checkpoint_interval", [500]),
        ("lr_warmup_steps", "100"),
        ("learning_rate", "0.001"),
        ("learning_rate", float("nan")),
        ("learning_rate", float("inf")),
        ("learning_rate", True),
        ("lr_scheduler", "cosine_with_warmup"),
        ("lr_scheduler", "Constant"),
        ("lr_scheduler", 1),
    ],
)
def test_wrongly_typed_values_are_refused_naming_the_field(field_name, value):
    err = invalid({field_name: value})
    assert [e.field_name for e in err.errors] == [field_name]
    assert err.errors[0].field_input == str(value)
    assert err.http_status == 400


def test_bad_scheduler_message_lists_the_enum():
    err = invalid({"lr_scheduler": "cosine_with_warmup"})
    assert err.errors[0].msg == (
        "Input should be one of linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup"
    )


@pytest.mark.parametrize("mode", ("expert", "fully_automated"))
def test_unknown_field_is_refused_naming_it(mode):
    with pytest.raises(E.InvalidParameterError) as info:
        resolve({"max_train_steps": 1000}, "fibo", mode)
    assert [e.field_name for e in info.value.errors] == ["max_train_steps"]
    assert info.value.errors[0].field_input == "1000"


@pytest.mark.parametrize(
    "field_name, value, expected",
    [
        ("total_training_steps", 500.0, TrainingParameters(1e-4, "constant_with_warmup", 128, 500, 500, 100)),
        ("rank", 64.0, TrainingParameters(1e-4, "constant_with_warmup", 64, 750, 500, 100)),
        ("checkpoint_interval", 500.0, TrainingParameters(1e-4, "constant_with_warmup", 128, 750, 500, 100)),
        ("lr_warmup_steps", 500.0, TrainingParameters(1e-4, "constant_with_warmup", 128, 750, 500, 500)),
    ],
)
def test_integral_float_for_int_field_is_accepted_as_int(field_name, value, expected):
    result = resolve({field_name: value})
    assert result == expected
    assert type(getattr(result, field_name)) is int


def test_learning_rate_given_as_int_is_a_float():
    # JSON has one number type: an integral learning_rate is range-checked, not type-refused
    err = invalid({"learning_rate": 1})
    assert [e.field_name for e in err.errors] == ["learning_rate"]
    assert err.errors[0].msg == "Input should be less than or equal to 0.001"


def test_several_bad_fields_are_reported_in_one_error():
    err = invalid(
        {"rank": 3, "learning_rate": "fast", "total_training_steps": 5001, "lr_scheduler": "cosine_with_warmup",
         "lr_warmup_steps": 1001}
    )
    assert sorted(e.field_name for e in err.errors) == [
        "learning_rate", "lr_scheduler", "lr_warmup_steps", "rank", "total_training_steps"
    ]
    assert len(err.to_dict()["errors"]) == 5
    for name in ("rank", "learning_rate", "total_training_steps", "lr_scheduler", "lr_warmup_steps"):
        assert name in err.message


def test_several_unknown_fields_are_reported_together():
    err = invalid({"max_train_steps": 1, "batch_size": 2})
    assert [e.field_name for e in err.errors] == ["batch_size", "max_train_steps"]


# ---- the lr_warmup_steps null rule ---------------------------------------------------------------


@pytest.mark.parametrize("version", ("fibo", "max", "2.3"))
@pytest.mark.parametrize("scheduler", NON_WARMUP_SCHEDULERS)
@pytest.mark.parametrize("warmup", [None, 0, 200])
def test_warmup_is_null_for_every_non_warmup_scheduler(version, scheduler, warmup):
    result = resolve({"lr_scheduler": scheduler, "lr_warmup_steps": warmup}, version)
    assert result.lr_scheduler == scheduler
    assert result.lr_warmup_steps is None
    assert result.effective_warmup_steps == 0
    assert result.to_dict()["lr_warmup_steps"] is None


@pytest.mark.parametrize("version", SPELLINGS)
@pytest.mark.parametrize("warmup, expected", [(None, 100), (0, 0), (250, 250)])
def test_warmup_is_an_int_for_constant_with_warmup(version, warmup, expected):
    result = resolve({"lr_scheduler": "constant_with_warmup", "lr_warmup_steps": warmup}, version)
    assert result.lr_warmup_steps == expected
    assert type(result.lr_warmup_steps) is int
    assert result.effective_warmup_steps == expected


def test_fibo_default_warmup_is_100():
    assert resolve({}).lr_warmup_steps == 100
    assert resolve({}).effective_warmup_steps == 100


@pytest.mark.parametrize("version", LEGACY_SPELLINGS)
def test_legacy_default_warmup_is_null(version):
    result = resolve({}, version)
    assert result.lr_warmup_steps is None
    assert result.effective_warmup_steps == 0


def test_out_of_range_warmup_is_refused_even_for_a_non_warmup_scheduler():
    err = invalid({"lr_scheduler": "cosine", "lr_warmup_steps": 1001})
    assert [e.field_name for e in err.errors] == ["lr_warmup_steps"]


# ---- omitted checkpoint_interval is capped to short runs ------------------------------------------


@pytest.mark.parametrize(
    "version, total, interval",
    [("fibo", 300, 300), ("fibo", 1, 1), ("fibo", 499, 499), ("fibo", 500, 500), ("fibo", 501, 500),
     ("3.2", 300, 300), ("light", 1, 1)],
)
def test_omitted_checkpoint_interval_is_capped_to_total_steps(version, total, interval):
    result = resolve({"total_training_steps": total}, version)
    assert result.total_training_steps == total
    assert result.checkpoint_interval == interval


def test_given_interval_above_a_short_total_is_refused_not_capped():
    err = invalid({"total_training_steps": 300, "checkpoint_interval": 500})
    assert [e.field_name for e in err.errors] == ["checkpoint_interval"]


# ---- checkpoint steps ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "total, interval, expected",
    [
        (750, 500, [500, 750]),
        (1000, 500, [500, 1000]),
        (1500, 500, [500, 1000, 1500]),
        (200, 100, [100, 200]),
        (250, 100, [100, 200, 250]),
        (1, 1, [1]),
        (300, 300, [300]),
    ],
)
def test_planned_checkpoint_steps(total, interval, expected):
    assert planned_checkpoint_steps(total, interval) == expected
    params = TrainingParameters(1e-4, "constant", 128, total, interval, None)
    assert params.checkpoint_steps() == expected


def test_planned_checkpoint_steps_at_the_maximum():
    steps = planned_checkpoint_steps(5000, 100)
    assert len(steps) == 50
    assert steps[0] == 100
    assert steps[-1] == 5000
    assert steps == list(range(100, 5001, 100))


@pytest.mark.parametrize("version, expected", [("fibo", [500, 750]), ("2.3", [500, 1000, 1500])])
def test_default_checkpoint_steps_per_family(version, expected):
    assert resolve({}, version).checkpoint_steps() == expected


# ---- training_version spellings ------------------------------------------------------------------


@pytest.mark.parametrize(
    "spelling, canonical",
    [("fibo", "fibo"), ("max", "max"), ("light", "light"), ("3.2", "3.2"), ("bria-3.2", "3.2"),
     ("2.3", "2.3"), ("bria-2.3", "2.3"), ("FIBO", "fibo"), (" Bria-3.2 ", "3.2")],
)
def test_canonical_version(spelling, canonical):
    assert canonical_version(spelling) == canonical


@pytest.mark.parametrize("spelling", ["bria-fibo", "3.1", "", "fibo2", "bria"])
def test_unknown_training_version_lists_accepted_spellings(spelling):
    with pytest.raises(E.UnknownTrainingVersionError) as info:
        canonical_version(spelling)
    for accepted in SPELLINGS:
        assert accepted in info.value.message
    assert info.value.http_status == 400
    assert info.value.code == "unknown_training_version"


def test_resolving_with_an_unknown_version_raises():
    with pytest.raises(E.UnknownTrainingVersionError):
        resolve({}, "3.1")


# ---- start preconditions -------------------------------------------------------------------------


def _model(version: str = "fibo", status: str = "Created", mode: str = "expert") -> ModelRecord:
    return ModelRecord(
        id=12242, name="Test Model", dataset_id=13749, project_id=12429, training_version=version,
        training_mode=mode, description="Test description", status=status,
        created_at="2025-08-20T09:51:58.080018", updated_at="2025-08-20T09:51:58.080020",
    )


def _dataset(version: str = "fibo", status: str = "completed", prefix: str | None = None) -> DatasetRecord:
    return DatasetRecord(
        id=13749, project_id=12429, status=status, training_version=version, path="/data/ds", caption_prefix=prefix
    )


@pytest.mark.parametrize("status", ["InProgress", "Completed", "Stopped", "Failed"])
@pytest.mark.parametrize("dataset_status", ["completed", "draft"])
def test_model_not_created_is_409_even_with_a_draft_dataset(status, dataset_status):
    with pytest.raises(E.TrainingAlreadyStartedError) as info:
        check_can_start(_model(status=status), _dataset(status=dataset_status))
    assert info.value.http_status == 409


def test_model_not_created_wins_over_incompatible_dataset():
    with pytest.raises(E.TrainingAlreadyStartedError):
        check_can_start(_model("fibo", status="InProgress"), _dataset("3.2", status="draft"))


def test_draft_dataset_is_412():
    with pytest.raises(E.DatasetNotCompletedError) as info:
        check_can_start(_model(), _dataset(status="draft"))
    assert info.value.http_status == 412


def test_draft_dataset_wins_over_incompatible_dataset():
    with pytest.raises(E.DatasetNotCompletedError):
        check_can_start(_model("fibo"), _dataset("max", status="draft"))


@pytest.mark.parametrize(
    "model_version, dataset_version",
    [("fibo", "max"), ("fibo", "bria-2.3"), ("max", "fibo"), ("3.2", "fibo"), ("bria-2.3", "fibo")],
)
def test_fibo_and_legacy_do_not_mix(model_version, dataset_version):
    with pytest.raises(E.IncompatibleDatasetError) as info:
        check_can_start(_model(model_version), _dataset(dataset_version))
    assert info.value.http_status == 400


@pytest.mark.parametrize(
    "model_version, dataset_version",
    [("fibo", "fibo"), ("max", "2.3"), ("light", "3.2"), ("bria-3.2", "3.2"), ("2.3", "max")],
)
def test_compatible_model_and_dataset_may_start(model_version, dataset_version):
    assert check_can_start(_model(model_version), _dataset(dataset_version)) is None


# ---- the 200 body --------------------------------------------------------------------------------

RESPONSE_FIELDS = {
    "id", "name", "description", "status", "dataset_id", "training_version", "training_mode",
    "generation_prefix", "project_id", "created_at", "updated_at", "custom_metadata",
    "active_model_version", "training_parameters", "checkpoint_steps",
}


def test_response_matches_the_documented_example_for_fibo():
    params = resolve({})
    body = build_response(_model(), _dataset(prefix="ignored"), params, "2025-08-20T10:00:00").to_dict()
    assert set(body) == RESPONSE_FIELDS
    assert body == {
        "id": 12242, "name": "Test Model", "description": "Test description", "status": "InProgress",
        "dataset_id": 13749, "training_version": "fibo", "training_mode": "expert", "generation_prefix": None,
        "project_id": 12429, "created_at": "2025-08-20T09:51:58.080018", "updated_at": "2025-08-20T10:00:00",
        "custom_metadata": "", "active_model_version": "default",
        "training_parameters": {"learning_rate": 0.0001, "lr_scheduler": "constant_with_warmup", "rank": 128,
                                "total_training_steps": 750, "checkpoint_interval": 500, "lr_warmup_steps": 100},
        "checkpoint_steps": [],
    }


@pytest.mark.parametrize("version", LEGACY_SPELLINGS)
def test_legacy_response_takes_generation_prefix_from_dataset(version):
    params = resolve({}, version)
    body = build_response(_model(version), _dataset(version, prefix="a photo of sks, "), params, "t").to_dict()
    assert set(body) == RESPONSE_FIELDS
    assert body["generation_prefix"] == "a photo of sks, "
    assert body["status"] == "InProgress"
    assert body["checkpoint_steps"] == []
    assert body["training_version"] == version
    assert body["training_parameters"] == {
        "learning_rate": 0.0001, "lr_scheduler": "constant", "rank": 128,
        "total_training_steps": 1500, "checkpoint_interval": 500, "lr_warmup_steps": None,
    }


@pytest.mark.parametrize("scheduler", NON_WARMUP_SCHEDULERS)
def test_response_reports_null_warmup_for_non_warmup_schedulers(scheduler):
    params = resolve({"lr_scheduler": scheduler, "lr_warmup_steps": 300, "rank": 44})
    body = build_response(_model(), _dataset(), params, "t").to_dict()
    assert body["training_parameters"] == {
        "learning_rate": 0.0001, "lr_scheduler": scheduler, "rank": 44,
        "total_training_steps": 750, "checkpoint_interval": 500, "lr_warmup_steps": None,
    }


def test_response_status_is_in_progress_and_updated_at_is_the_given_time():
    resp = build_response(_model(), _dataset(), resolve({}), "2030-01-01T00:00:00")
    assert resp.status == "InProgress"
    assert resp.updated_at == "2030-01-01T00:00:00"
    assert resp.created_at == "2025-08-20T09:51:58.080018"
    assert resp.training_parameters == FIBO_DEFAULT


# ---- stable error codes --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls, code, http_status",
    [
        (E.TailoredGenError, "internal_error", 500),
        (E.InvalidParameterError, "invalid_parameter", 400),
        (E.ExpertModeRequiredError, "expert_mode_required", 400),
        (E.UnknownTrainingVersionError, "unknown_training_version", 400),
        (E.IncompatibleDatasetError, "incompatible_dataset", 400),
        (E.UnauthorizedError, "unauthorized", 401),
        (E.NotFoundError, "not_found", 404),
        (E.TrainingAlreadyStartedError, "training_already_started", 409),
        (E.DatasetNotCompletedError, "dataset_not_completed", 412),
        (E.DatasetInvalidError, "dataset_invalid", 412),
        (E.RateLimitedError, "rate_limited", 429),
        (E.ConfigError, "invalid_config", 500),
        (E.BaseModelError, "base_model_invalid", 500),
        (E.ResumeError, "cannot_resume", 409),
        (E.OutputDirError, "output_dir_invalid", 500),
        (E.OutOfMemoryError, "oom", 500),
        (E.NonFiniteLossError, "non_finite_loss", 500),
    ],
)
def test_error_codes_are_stable(cls, code, http_status):
    assert cls.code == code
    assert cls.http_status == http_status
    assert issubclass(cls, E.TailoredGenError)


def test_error_to_dict_carries_code_and_message():
    err = E.DatasetNotCompletedError("draft")
    assert err.to_dict() == {"code": "dataset_not_completed", "message": "draft"}
