"`lungseg demo` before it starts: a warm-up measures this machine, a slow one is told the estimate and `--quick` at once."
import pytest
import lung_tumor_seg.demo as demo
import lung_tumor_seg.phantom as phantom
from lung_tumor_seg.core import LungsegError

def _started(monkeypatch, capsys, tmp_path, slower, precision='bf16-mixed'):
    "The lines the demo prints before its first stage, on a machine `slower` times the recorded one (a list: one per warm-up); the first stage is stopped."
    ref, speeds = demo.DEMO_REFERENCE, iter(slower if isinstance(slower, list) else [slower]*2)
    def warmup(config):
        s = next(speeds)
        return dict(step_s=s*ref['step_s'], cpu_step_s=s*ref['cpu_step_s'], precision=precision, compiled=False, threads=2)
    monkeypatch.setattr(demo, 'warmup_step_s', warmup)
    def stop(*args, **kwargs): raise LungsegError('stopped after the warm-up')
    monkeypatch.setattr(phantom, 'cached_phantom', stop)
    with pytest.raises(LungsegError, match='stopped after the warm-up'): demo.run_demo(tmp_path)
    return capsys.readouterr().out.splitlines()

def test_a_slow_machine_hears_the_estimate_and_the_quick_run_before_any_stage(monkeypatch, capsys, tmp_path):
    lines = _started(monkeypatch, capsys, tmp_path, 3, '32-true')
    note = next(i for i, l in enumerate(lines) if l.startswith('[demo] note:'))
    assert note < next(i for i, l in enumerate(lines) if l.startswith('[demo] phantom'))   # said before the first stage
    minutes = round(3*demo.DEMO_REFERENCE['wall_s']/60)
    assert f'about {minutes} min, over its 15-minute budget' in lines[note] and 'lungseg demo --quick' in lines[note]
    assert '(training in 32-true)' in lines[note]

def test_a_machine_within_the_budget_gets_the_estimate_only(monkeypatch, capsys, tmp_path):
    lines = _started(monkeypatch, capsys, tmp_path, 0.5)
    assert any(l.startswith('[demo] warm-up:') and f"about {round(demo.DEMO_REFERENCE['wall_s']/120)} min" in l for l in lines)
    assert not any(l.startswith('[demo] note:') for l in lines)

def test_a_slow_first_warm_up_is_measured_again_before_the_budget_note(monkeypatch, capsys, tmp_path):
    "A first warm-up slowed by what ran just before (the set-up of a fresh clone) is measured once more, and the faster one counts."
    lines = _started(monkeypatch, capsys, tmp_path, [2.0, 0.9])
    assert any(l.startswith('[demo] warm-up:') and f"about {round(0.9*demo.DEMO_REFERENCE['wall_s']/60)} min" in l for l in lines)
    assert not any(l.startswith('[demo] note:') for l in lines)

def test_quick_is_a_quarter_of_the_demo(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(demo, 'run_demo', lambda out, n_patients, seed, max_slices, config, max_epochs, predict: seen.update(n=n_patients, epochs=max_epochs))
    assert demo.demo_main(['--quick', '--out', str(tmp_path)]) == 0
    assert seen == dict(n=demo.DEMO_QUICK['n_patients'], epochs=demo.DEMO_QUICK['max_epochs'])
    from lung_tumor_seg.training import config_path, load_config
    share = demo.demo_fraction(seen['n'], seen['epochs'], load_config(config_path('demo'))['trainer']['max_epochs'])
    assert share == pytest.approx((0.25, 0.25))   # 6 of 24 epochs, 40 of 160 patients
    assert demo.demo_fraction(demo.DEMO_PATIENTS, None, 24) == (1.0, 1.0)

def test_the_estimate_scales_training_by_its_step_and_the_rest_by_the_cpu():
    "Training follows the step of the chosen path, the other stages the plain fp32 step: a forced fp32 run on the recorded machine."
    ref = demo.DEMO_REFERENCE
    assert demo.estimate_demo_s(dict(step_s=ref['step_s'], cpu_step_s=ref['cpu_step_s'])) == pytest.approx(ref['wall_s'])
    fp32 = demo.estimate_demo_s(dict(step_s=2*ref['step_s'], cpu_step_s=ref['cpu_step_s']))   # training twice as slow, the CPU the same
    assert fp32 == pytest.approx(ref['wall_s'] + ref['train_s'])
