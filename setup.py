"""Packaging beyond pyproject.toml: installs `diffkd_torchvision_compat.pth` into site-packages.

Python runs a site-packages `.pth` file at start-up, so `import timm` (or torchvision) works in
diffkd's environment without importing diffkd first: the hook installs diffkd's torchvision shim
(diffkd/_torchvision_compat.py), which does nothing where torchvision's C extension loads, and the
hook itself does nothing where diffkd cannot be imported. A file at the root of a wheel lands in
site-packages: `build_py` puts it there for regular wheels, `editable_wheel` for `pip install -e`.
"""
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

HOOK = "diffkd_torchvision_compat.pth"
HOOK_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), HOOK)


class BuildPyWithHook(build_py):
    def run(self):
        super().run()
        if not self.editable_mode:
            self.copy_file(HOOK_SOURCE, os.path.join(self.build_lib, HOOK))

    def get_outputs(self, include_bytecode=True):
        extra = [] if self.editable_mode else [os.path.join(self.build_lib, HOOK)]
        return [*super().get_outputs(include_bytecode), *extra]


class EditableWheelWithHook(editable_wheel):
    def _run_build_commands(self, dist_name, unpacked_wheel, build_lib, tmp_dir):
        # everything in `unpacked_wheel` is written into the editable wheel, next to its own .pth
        outputs = super()._run_build_commands(dist_name, unpacked_wheel, build_lib, tmp_dir)
        shutil.copyfile(HOOK_SOURCE, os.path.join(unpacked_wheel, HOOK))
        return outputs


setup(cmdclass={"build_py": BuildPyWithHook, "editable_wheel": EditableWheelWithHook})
