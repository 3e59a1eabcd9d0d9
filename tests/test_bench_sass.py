"""bench.sass: the SASS of the CUDA C++ elementwise kernels, compiled by NVRTC and read with nvdisasm (no GPU).

Beyond the tool itself, these pin down what the kernels' speed rests on: each update's common path moves its
arrays with one 128-bit load or store each and reads its sample's coefficients once per four elements."""

import pytest

from bench import sass

pytest.importorskip("cuda.bindings.nvrtc")
try:
    sass.nvdisasm()
except FileNotFoundError:
    pytest.skip("nvdisasm not installed (pip install -e '.[test]')", allow_module_level=True)


@pytest.fixture(scope="module")
def rows():
    return {(r["family"], r["instance"]): r for r in sass.report()}


def _trip(rows, instance, unroll=1):
    return rows[(f"schedule (unroll {unroll})", instance)]["common_kinds"]


def test_q_sample_trip_moves_its_arrays_as_float4_and_reads_coefficients_once(rows):
    k = _trip(rows, "q_sample (draws ε, writes it)")
    assert k["global load 128-bit"] == 1  # x₀
    assert k["global store 128-bit"] == 2  # x_t and ε
    assert k["global load 32-bit"] == 2  # the sample's Bx and S, once for the block's four elements
    assert "global store 32-bit" not in k
    assert k["special (MUFU)"] == 2  # the reciprocal square roots of Box–Muller's two radii: the slow sqrt not taken


def test_noisy_step_and_ddim_trips(rows):
    noisy = _trip(rows, "DDPM / DDIM step (draws its noise)")
    quiet = _trip(rows, "DDPM / DDIM step (noise given, or none: DDIM η = 0)")
    for k in (noisy, quiet):
        assert k["global load 128-bit"] == 2 and k["global store 128-bit"] == 1  # x_t, ε̂ in; x_prev out
        assert k["global load 32-bit"] == 3  # Bx, Be, S once
    assert "special (MUFU)" not in quiet  # η = 0 draws nothing
    assert sum(quiet.values()) < sum(noisy.values()) / 2


def test_two_blocks_a_trip_load_both_before_drawing(rows):
    """FU_UNROLL = 2: the trip moves two float4 of each array, and issues fewer instructions an element."""
    q, step = _trip(rows, "q_sample (draws ε, writes it)", 2), _trip(rows, "DDPM / DDIM step (draws its noise)", 2)
    assert q["global load 128-bit"] == 2 and q["global store 128-bit"] == 4 and q["special (MUFU)"] == 4
    assert step["global load 128-bit"] == 4 and step["global store 128-bit"] == 2
    for instance in ("q_sample (draws ε, writes it)", "DDPM / DDIM step (draws its noise)"):
        one, two = (rows[(f"schedule (unroll {u})", instance)] for u in (1, 2))
        assert (one["trip_elements"], two["trip_elements"]) == (4, 8)
        assert two["common_path"] / 8 < one["common_path"] / 4


def test_every_instance_is_reported_without_its_loop_walk_for_given_noise(rows):
    assert len(rows) == 2 * 4 + 3 * 2
    assert "common_path" not in rows[("schedule (unroll 1)", "q_sample (ε given)")]
    for r in rows.values():
        assert r["registers"] and r["instructions"] == sum(r["kinds"].values())


def test_common_path_follows_the_shorter_arm_and_avoids_calls():
    ins = ["MOV R1, R2", "@P0 BRA `(.L_x_1)", "CALL.REL.NOINC `(slow)", "BRA `(.L_x_2)", "FADD R1, R1, R1",
           "BSYNC B0", "IADD3 R0, R0, 1, RZ", "@P1 BRA `(.L_x_0)"]
    labels = {".L_x_0": 0, ".L_x_1": 4, ".L_x_2": 5}
    assert sass.common_path(ins, labels) == ["MOV R1, R2", "@P0 BRA `(.L_x_1)", "FADD R1, R1, R1", "BSYNC B0",
                                             "IADD3 R0, R0, 1, RZ", "@P1 BRA `(.L_x_0)"]
    assert sass.kinds(["@!P0 LDG.E.128 R4, desc[UR4][R2.64]", "STG.E desc[UR4][R2.64], R1", "UIADD3 UR4, UR4, 1"]) \
        == {"global load 128-bit": 1, "global store 32-bit": 1, "uniform": 1}
