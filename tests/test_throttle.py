"""Clocks and slowdown reasons around a GPU case, read through a fake NVML."""

import pytest

from opbench.measure import hardware
from opbench.measure.hardware import clock_record, sample_clocks, throttle_reasons, watch_clocks

IDLE, APP_CLOCKS, SW_POWER_CAP, HW_SLOWDOWN, SW_THERMAL, HW_THERMAL, HW_POWER_BRAKE = (
    0x1, 0x2, 0x4, 0x8, 0x20, 0x40, 0x80)


class FakeNVML:
    """The pynvml calls hardware.py makes; each reading pops the next reasons bitmask."""
    NVML_CLOCK_SM, NVML_CLOCK_MEM, NVML_TEMPERATURE_GPU = 1, 2, 0

    def __init__(self, reasons, event_api=True):
        self.reasons = list(reasons)
        if event_api:
            self.nvmlDeviceGetCurrentClocksEventReasons = self._reasons

    def _reasons(self, handle):
        return self.reasons.pop(0)

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle):
        return self._reasons(handle)

    def nvmlDeviceGetClockInfo(self, handle, clock):
        return {1: 1755, 2: 2619}[clock]

    def nvmlDeviceGetTemperature(self, handle, sensor):
        return 71

    def nvmlDeviceGetPowerUsage(self, handle):
        return 612_500  # milliwatts


def test_a_sample_reads_clocks_temperature_power_and_reasons():
    s = sample_clocks(FakeNVML([SW_THERMAL | IDLE]), "handle")
    assert (s.sm_clock_mhz, s.mem_clock_mhz, s.temperature_c, s.power_w, s.event_reasons) == (
        1755, 2619, 71, 612.5, SW_THERMAL | IDLE)


def test_older_drivers_read_the_throttle_reasons_entry_point():
    assert sample_clocks(FakeNVML([HW_SLOWDOWN], event_api=False), "h").event_reasons == HW_SLOWDOWN

    class Driver530(FakeNVML):  # pynvml has the new call, the driver library does not
        def nvmlDeviceGetCurrentClocksEventReasons(self, handle):
            raise RuntimeError("NVML_ERROR_FUNCTION_NOT_FOUND")
    assert sample_clocks(Driver530([SW_POWER_CAP], event_api=False), "h").event_reasons == SW_POWER_CAP


def test_a_field_the_gpu_does_not_report_reads_as_none():
    class NoPower(FakeNVML):
        def nvmlDeviceGetPowerUsage(self, handle):
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
    assert sample_clocks(NoPower([0]), "h").power_w is None


@pytest.mark.parametrize("mask, flagged", [
    (0, []),
    (IDLE | APP_CLOCKS, []),  # idle and application-clock settings are not slowdowns
    (SW_POWER_CAP, ["sw_power_cap"]),
    (HW_SLOWDOWN | HW_THERMAL, ["hw_slowdown", "hw_thermal"]),
    (SW_THERMAL | HW_POWER_BRAKE | IDLE, ["sw_thermal", "hw_power_brake"]),
    (None, []),
])
def test_only_thermal_and_power_reasons_flag(mask, flagged):
    assert throttle_reasons(mask) == flagged


def test_a_slowdown_before_or_after_the_timing_flags_the_case():
    nvml = FakeNVML([SW_THERMAL, IDLE, IDLE, HW_POWER_BRAKE, IDLE, IDLE])
    before_hot, after_idle = sample_clocks(nvml, "h"), sample_clocks(nvml, "h")
    assert clock_record(before_hot, after_idle)["throttled"] == ["sw_thermal"]
    assert clock_record(sample_clocks(nvml, "h"), sample_clocks(nvml, "h"))["throttled"] == ["hw_power_brake"]
    record = clock_record(sample_clocks(nvml, "h"), sample_clocks(nvml, "h"))
    assert record["throttled"] == []
    assert record["clocks"]["before"]["sm_clock_mhz"] == 1755 and record["clocks"]["after"]["temperature_c"] == 71


def test_watch_clocks_samples_around_a_cuda_case_only(monkeypatch):
    nvml = FakeNVML([IDLE, SW_POWER_CAP])
    monkeypatch.setattr(hardware, "_nvml_device", lambda: (nvml, "handle"))
    with watch_clocks("cuda") as record:
        assert record == {}  # filled once the timing is done
    assert record["throttled"] == ["sw_power_cap"] and nvml.reasons == []
    with watch_clocks("cpu") as record:
        pass
    assert record == {}


def test_watch_clocks_without_nvml_leaves_the_case_unannotated(monkeypatch):
    monkeypatch.setattr(hardware, "_nvml_device", lambda: None)
    with watch_clocks("cuda") as record:
        pass
    assert record == {}
