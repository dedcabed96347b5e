# colcon/ament_python entry: pip reads pyproject.toml; colcon additionally needs the ament index marker
# and package.xml installed under share/, which is all this file adds.
from setuptools import setup

setup(
    data_files=[
        ("share/ament_index/resource_index/packages", ["resource/ghil"]),
        ("share/ghil", ["package.xml"]),
        ("share/ghil/launch", ["launch/ghil.launch.py"]),
    ],
)
