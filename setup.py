import re

from setuptools import setup

# One version, the scripts'.
with open("udpProxyServer.py") as f:
    VERSION = re.search(r'^__version__ = "(.*)"$', f.read(), re.M).group(1)

setup(
    name="udpProxyServer",
    version=VERSION,
    description="A UDP tunnel mesh for Linux: TUN devices carried to peers over UDP",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    license_files=["LICENSE"],
    py_modules=["udpProxyServer", "udpProxyServerControl"],
    # The commands, and the two scripts under their 2015 names for scripts that call those.
    entry_points={"console_scripts": [
        "udpProxyServer = udpProxyServer:main",
        "udpProxyServerControl = udpProxyServerControl:main",
    ]},
    scripts=["udpProxyServer.py", "udpProxyServerControl.py"],
    # man udpProxyServer and man udpProxyServerControl, made by make man from the parsers.
    data_files=[("share/man/man8", ["man/udpProxyServer.8", "man/udpProxyServerControl.8"])],
    install_requires=["python-pytun>=2.4", "pyroute2>=0.7", "cryptography>=41"],
    python_requires=">=3.8",
    classifiers=[
        "License :: OSI Approved :: MIT License",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Topic :: System :: Networking",
    ],
)
