"""The machine's state around a case: the card's clocks, power, temperature, slowdowns and violation
counters read through a fake NVML; the host's load and steal read from fake /proc files."""

import itertools
import statistics
import time
from types import SimpleNamespace

import pytest

from opbench.measure import hardware
from opbench.measure.hardware import HostWatch, gpu_watch, sample_clocks, throttle_reasons

IDLE, APP_CLOCKS, SW_POWER_CAP, HW_SLOWDOWN, SW_THERMAL, HW_THERMAL, HW_POWER_BRAKE = (
    0x1, 0x2, 0x4, 0x8, 0x20, 0x40, 0x80)


class FakeNVML:
    """The pynvml calls hardware.py makes. Each reading of the reasons pops the next bitmask of
    `reasons` (then `mask`); clocks, power and temperature change at every reading, and every value
    handed out is kept, so a test can average what the watcher saw."""
    NVML_CLOCK_SM, NVML_CLOCK_MEM, NVML_TEMPERATURE_GPU = 1, 2, 0
    NVML_PERF_POLICY_POWER, NVML_PERF_POLICY_THERMAL = 0, 1

    def __init__(self, reasons=(), event_api=True, violations_ns=None):
        self.reasons, self.mask = list(reasons), IDLE
        self.sm, self.power_mw, self.temperature = [], [], []
        self._step = itertools.count()
        self.violations_ns = {k: list(v) for k, v in (violations_ns or {}).items()}
        if event_api:
            self.nvmlDeviceGetCurrentClocksEventReasons = self._reasons

    def _reasons(self, handle):
        return self.reasons.pop(0) if self.reasons else self.mask

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle):
        return self._reasons(handle)

    def nvmlDeviceGetClockInfo(self, handle, clock):
        if clock == self.NVML_CLOCK_MEM:
            return 2619
        self.sm.append(1410 + 45 * (next(self._step) % 13))
        return self.sm[-1]

    def nvmlDeviceGetTemperature(self, handle, sensor):
        self.temperature.append(61 + len(self.temperature) % 17)
        return self.temperature[-1]

    def nvmlDeviceGetPowerUsage(self, handle):
        self.power_mw.append(400_000 + 12_345 * (len(self.power_mw) % 7))
        return self.power_mw[-1]

    def nvmlDeviceGetViolationStatus(self, handle, policy):
        return SimpleNamespace(referenceTime=0, violationTime=self.violations_ns[policy].pop(0))


def test_a_sample_reads_clocks_temperature_power_and_reasons():
    s = sample_clocks(FakeNVML([SW_THERMAL | IDLE]), "handle")
    assert (s.sm_clock_mhz, s.mem_clock_mhz, s.temperature_c, s.power_w, s.event_reasons) == (
        1410, 2619, 61, 400.0, SW_THERMAL | IDLE)


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


def test_gpu_watch_averages_the_rounds_and_takes_the_counters_difference():
    nvml = FakeNVML(violations_ns={0: [1_500_000_000, 1_750_000_000], 1: [3_000_000, 203_000_000]})
    with gpu_watch((nvml, "handle")) as watch:
        assert watch.state is None  # filled once the rounds are done
        time.sleep(0.04)  # the sampler reads every 5 ms meanwhile
    state = watch.state
    assert state.samples == len(nvml.sm) >= 2  # one reading before the rounds and one after, at least
    assert state.sm_clock_mhz == pytest.approx(statistics.fmean(nvml.sm))
    assert state.power_w == pytest.approx(statistics.fmean(nvml.power_mw) / 1000)
    assert state.temperature_c == max(nvml.temperature)  # the hottest reading, not the mean
    assert state.power_violation_s == pytest.approx(0.25) and state.thermal_violation_s == pytest.approx(0.2)
    assert state.throttled == ()  # idle only


def test_gpu_watch_flags_a_slowdown_seen_before_during_or_after_the_rounds():
    nvml = FakeNVML([SW_POWER_CAP | IDLE], violations_ns={0: [0, 0], 1: [0, 0]})  # the first reading
    with gpu_watch((nvml, "h")) as watch:
        nvml.mask = HW_SLOWDOWN | APP_CLOCKS  # from now on, the last reading included
    assert watch.state.throttled == ("sw_power_cap", "hw_slowdown")


def test_gpu_watch_without_violation_counters_or_nvml():
    class NoViolations(FakeNVML):
        def nvmlDeviceGetViolationStatus(self, handle, policy):
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
    with gpu_watch((NoViolations(), "h")) as watch:
        pass
    assert watch.state.power_violation_s is None and watch.state.thermal_violation_s is None
    assert watch.state.sm_clock_mhz is not None
    with gpu_watch(None) as watch:  # a CPU run, or no NVML: nothing recorded
        pass
    assert watch.state is None


def test_gpu_watch_finds_the_device_itself(monkeypatch):
    nvml = FakeNVML(violations_ns={0: [0, 10**9], 1: [0, 0]})
    monkeypatch.setattr(hardware, "_nvml_device", lambda: (nvml, "handle"))
    with gpu_watch() as watch:
        pass
    assert watch.state.power_violation_s == 1.0
    monkeypatch.setattr(hardware, "_nvml_device", lambda: None)
    with gpu_watch() as watch:
        pass
    assert watch.state is None


# the host ---------------------------------------------------------------------------------------------

def _host(times, load, monkeypatch, cores=4):
    monkeypatch.setattr(hardware, "cpu_count", lambda: cores)
    readings = iter(times)
    with HostWatch(times=lambda: next(readings), loadavg=lambda: load) as watch:
        pass
    return watch.load


@pytest.mark.parametrize("times, load, per_core, steal, busy", [
    ([(10_000, 20), (10_400, 21)], 2.0, 0.5, 1 / 400, False),  # a quiet host
    ([(10_000, 20), (10_400, 21)], 4.4, 1.1, 1 / 400, True),  # more runnable threads than cores
    ([(10_000, 20), (10_400, 50)], 1.0, 0.25, 30 / 400, True),  # the hypervisor took 7.5%
    ([(10_000, 20), (10_400, 40)], 4.0, 1.0, 20 / 400, False),  # at both limits, not over them
    ([None, None], 0.0, 0.0, 0.0, False),  # no /proc/stat
    ([(10_000, 20), (10_000, 20)], 1.0, 0.25, 0.0, False),  # no time passed between the readings
])
def test_host_watch_flags_a_busy_host(monkeypatch, times, load, per_core, steal, busy):
    host = _host(times, load, monkeypatch)
    assert host.load_per_core == pytest.approx(per_core) and host.steal == pytest.approx(steal)
    assert host.busy is busy


def test_host_watch_without_a_load_average(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_count", lambda: 2)

    def no_loadavg():
        raise OSError("getloadavg unavailable")
    with HostWatch(times=lambda: (5, 0), loadavg=no_loadavg) as watch:
        pass
    assert watch.load == hardware.HostLoad(0.0, 0.0, False)


def test_proc_stat_is_read_as_total_and_steal(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 3 50 1000 5 0 9 7 0 0\ncpu0 50 1 25 500 2 0 4 3 0 0\n")
    assert hardware._cpu_times(stat) == (1174, 7)
    stat.write_text("cpu  100 3 50 1000\n")  # a kernel without the steal column
    assert hardware._cpu_times(stat) == (1153, 0)
    assert hardware._cpu_times(tmp_path / "missing") is None
