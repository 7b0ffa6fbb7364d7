"""The drill's saturation detector, on /proc/stat and /proc/pressure/cpu figures recorded on
the 2-CPU machine the drills run on (the long intr and softirq lines cut)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from discovery.drill.saturation import (
    CpuSample,
    HostMonitor,
    Strain,
    Thresholds,
    host_figures,
    parse_pressure,
    parse_proc_stat,
    read_sample,
)

# Half a second apart, a discovery dev cluster and a drill running: the CPUs 58% busy.
UNSATURATED = (
    """cpu  106624 0 21190 57745 118 0 2073 65 0 0
cpu0 51285 0 10629 30780 23 0 1046 28 0 0
cpu1 55338 0 10561 26965 95 0 1027 36 0 0
ctxt 18750197
btime 1796055292
processes 14306
procs_running 3
procs_blocked 0
""",
    """cpu  106678 0 21192 57786 118 0 2074 65 0 0
cpu0 51289 0 10631 30820 23 0 1047 28 0 0
cpu1 55389 0 10561 26965 95 0 1027 36 0 0
ctxt 18755020
btime 1796055292
processes 14311
procs_running 3
procs_blocked 0
""",
)
UNSATURATED_PSI = (
    "some avg10=19.84 avg60=33.83 avg300=43.55 total=411881502\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
    "some avg10=19.84 avg60=33.83 avg300=43.55 total=411891372\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
)
# The same machine with two `while :; do :; done` loops added: no idle time at all.
SATURATED = (
    """cpu  104511 0 20988 56719 118 0 2057 64 0 0
cpu0 50328 0 10528 30183 23 0 1037 28 0 0
cpu1 54182 0 10460 26536 94 0 1020 36 0 0
ctxt 18506747
procs_running 4
procs_blocked 0
""",
    """cpu  104609 0 20996 56719 118 0 2057 64 0 0
cpu0 50378 0 10531 30183 23 0 1037 28 0 0
cpu1 54230 0 10465 26536 94 0 1020 36 0 0
ctxt 18519226
procs_running 7
procs_blocked 0
""",
)
SATURATED_PSI = (
    "some avg10=44.49 avg60=38.40 avg300=44.93 total=408510626\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
    "some avg10=44.49 avg60=38.40 avg300=44.93 total=408936999\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
)


def samples(stats: tuple[str, str], psi: tuple[str, str] | None, at: float = 0.0, dt: float = 0.5) -> list[CpuSample]:
    out = []
    for i, text in enumerate(stats):
        busy, total, running = parse_proc_stat(text)
        out.append(CpuSample(at + i * dt, busy, total, running, parse_pressure(psi[i]) if psi else None))
    return out


def test_proc_stat_busy_is_every_kind_but_idle_and_iowait() -> None:
    busy, total, running = parse_proc_stat(UNSATURATED[0])
    assert busy == 106624 + 21190 + 2073 + 65
    assert total == busy + 57745 + 118
    assert running == 3


def test_an_old_kernel_without_steal_still_parses() -> None:
    assert parse_proc_stat("cpu  10 0 5 85\nprocs_running 2\n") == (15, 100, 2)


def test_proc_stat_without_a_cpu_line_is_an_error() -> None:
    with pytest.raises(ValueError, match="no cpu line"):
        parse_proc_stat("procs_running 2\n")


def test_pressure_is_the_some_total() -> None:
    assert parse_pressure(SATURATED_PSI[1]) == 408936999
    assert parse_pressure("full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n") is None


def test_recorded_figures_of_a_machine_with_cpu_to_spare() -> None:
    s = samples(UNSATURATED, UNSATURATED_PSI)
    h = host_figures(s, 0.0, 0.5, cpus=2)
    assert h.busy == pytest.approx(57 / 98)  # 0.58: 57 jiffies busy, 41 idle
    assert h.cpu_wait == pytest.approx(9870 / 500_000)  # 2% of the time a task waited
    assert h.runnable == pytest.approx(1.0)  # (2 + 2) / 2 samples / 2 CPUs, the reader left out
    strain = Strain.of(s, [], Thresholds(), cpus=2)
    assert strain.stretches == ()
    assert not strain.met(0.0, 0.5)
    assert strain.describe(0.0, 0.5) == "no saturation seen"


def test_recorded_figures_of_a_saturated_machine() -> None:
    s = samples(SATURATED, SATURATED_PSI)
    h = host_figures(s, 0.0, 0.5, cpus=2)
    assert h.busy == 1.0
    assert h.cpu_wait == pytest.approx(0.853, abs=0.001)
    strain = Strain.of(s, [], Thresholds(), cpus=2)
    (stretch,) = strain.stretches
    assert (stretch.start, stretch.end, stretch.busy) == (0.0, 0.5, 1.0)
    assert strain.met(0.4, 0.45)
    assert strain.describe(0.0, 0.5) == (
        "host saturated 0.5 s of 0.5 s (CPU 100% busy, tasks waiting for a CPU 85% of the time, 2 CPUs)"
    )


def test_either_figure_past_its_threshold_saturates() -> None:
    s = samples(UNSATURATED, UNSATURATED_PSI)
    assert Strain.of(s, [], Thresholds(busy=0.5), 2).stretches != ()
    assert Strain.of(s, [], Thresholds(cpu_wait=0.01), 2).stretches != ()
    # Without PSI (an older kernel, a container without it) busy alone decides.
    no_psi = samples(SATURATED, None)
    assert Strain.of(no_psi, [], Thresholds(), 2).stretches[0].cpu_wait is None
    assert Strain.of(no_psi, [], Thresholds(busy=1.01), 2).stretches == ()


def test_a_late_tick_is_a_stall_of_the_drill_from_when_it_was_due() -> None:
    strain = Strain.of([], [(10.0, 0.01), (11.0, 0.3), (12.0, 0.049)], Thresholds(), cpus=2)
    (stall,) = strain.stretches
    assert (stall.start, stall.late) == (11.0, 0.3)
    assert stall.end == pytest.approx(11.3)
    assert strain.met(11.1, 11.2) and not strain.met(9.0, 10.9)
    assert strain.stalled(11.1, 11.2, late=0.25) and not strain.stalled(11.1, 11.2, late=0.5)
    assert strain.describe(10.0, 12.0) == "the drill's load ran 1 ticks late (up to 300 ms)"
    figures = strain.figures(10.0, 13.0)
    assert figures["ticks"] == 3 and figures["ticks_late"] == 1 and figures["tick_late_max_ms"] == 300.0


def test_figures_of_a_stretch_without_two_samples_are_unknown() -> None:
    h = host_figures(samples(SATURATED, SATURATED_PSI), 0.1, 0.4, cpus=2)
    assert h.busy is None and h.cpu_wait is None and h.samples == 0


def test_read_sample_from_files(tmp_path: Path) -> None:
    stat, psi = tmp_path / "stat", tmp_path / "cpu"
    stat.write_text(SATURATED[0])
    psi.write_text(SATURATED_PSI[0])
    s = read_sample(stat, psi)
    assert s is not None and (s.busy, s.running, s.waited_us) == (104511 + 20988 + 2057 + 64, 4, 408510626)
    assert read_sample(stat, tmp_path / "absent").waited_us is None  # type: ignore[union-attr]
    assert read_sample(tmp_path / "absent", psi) is None  # not Linux: no figures, no saturation


def test_the_real_proc_stat_parses() -> None:
    if not Path("/proc/stat").exists():
        pytest.skip("not Linux")
    s = read_sample()
    assert s is not None and 0 <= s.busy <= s.total and s.running >= 1


async def test_the_monitor_samples_until_stopped() -> None:
    readings = iter(samples(SATURATED, SATURATED_PSI) * 50)
    monitor = HostMonitor(interval=0.01, read=lambda: next(readings))
    monitor.start()
    await asyncio.sleep(0.05)
    await monitor.stop()
    count = len(monitor.samples)
    assert count >= 3
    await asyncio.sleep(0.03)
    assert len(monitor.samples) == count  # stopped
