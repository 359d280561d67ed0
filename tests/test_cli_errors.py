"""Bad input: one clear line naming the key or path, exit status 2, nothing overwritten."""
import subprocess

from conftest import PYTHON, REPO, student_overrides


def run_train(*args):
    return subprocess.run([PYTHON, str(REPO / "launcher" / "train.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def one_line(done, *needles):
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_unknown_key_and_wrong_type():
    one_line(run_train("configs/fmnist.yaml", "optim.lrr=0.1"), "optim.lrr")
    one_line(run_train("configs/fmnist.yaml", "optim.lr=fast"), "optim.lr", "expected float")
    one_line(run_train("configs/nope.yaml"), "configs/nope.yaml", "not found")


def test_missing_data_and_teacher(tmp_path, tiny_data, teacher_file):
    one_line(run_train("configs/fmnist.yaml", f"data.train_path={tmp_path}/none.beton", f"out_dir={tmp_path}"),
             "data.train_path", f"{tmp_path}/none.beton")
    args = student_overrides(tiny_data, teacher_file, tmp_path, **{"teacher.checkpoint": f"{tmp_path}/t.pt"})
    one_line(run_train("configs/fmnist.yaml", *args), "teacher.checkpoint", f"{tmp_path}/t.pt")
    wrong = tmp_path / "wrong.pt"
    wrong.write_bytes(b"not a checkpoint")
    args = student_overrides(tiny_data, teacher_file, tmp_path, **{"teacher.checkpoint": str(wrong)})
    one_line(run_train("configs/fmnist.yaml", *args), "teacher.checkpoint", str(wrong))
    assert not (tmp_path / "fmnist_fullrange").exists()


def test_existing_run_is_not_overwritten(tmp_path, tiny_data, teacher_file):
    run = tmp_path / "fmnist_fullrange"
    run.mkdir()
    (run / "model.pt").write_bytes(b"precious")
    one_line(run_train("configs/fmnist.yaml", *student_overrides(tiny_data, teacher_file, tmp_path)),
             "resume=true", str(run))
    assert (run / "model.pt").read_bytes() == b"precious"
    assert not (run / "config.yaml").exists()


def test_sweep_missing_run(tmp_path):
    done = subprocess.run([PYTHON, str(REPO / "launcher" / "sweep.py"), str(tmp_path / "norun")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    one_line(done, str(tmp_path / "norun"))
