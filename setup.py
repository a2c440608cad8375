from setuptools import setup

setup(
    name="udpProxyServer",
    version="2.1.0",
    description="A UDP tunnel mesh for Linux: TUN devices carried to peers over UDP",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    py_modules=["udpProxyServer", "udpProxyServerControl"],
    # The commands, and the two scripts under their 2015 names for scripts that call those.
    entry_points={"console_scripts": [
        "udpProxyServer = udpProxyServer:main",
        "udpProxyServerControl = udpProxyServerControl:main",
    ]},
    scripts=["udpProxyServer.py", "udpProxyServerControl.py"],
    install_requires=["python-pytun>=2.4", "pyroute2>=0.7", "cryptography>=41"],
    python_requires=">=3.8",
    classifiers=[
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Topic :: System :: Networking",
    ],
)
