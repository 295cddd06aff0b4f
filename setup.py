"""Packaging for imgresume: the library, the ``imgresume`` console script and
the twistd plugins ``imgresume`` (server) and ``imgresume-lb`` (balancer).
The build backend is named in pyproject.toml; the example .tac files and
systemd units are installed under ``<prefix>/share/imgresume/``."""

from glob import glob

from setuptools import find_packages, setup

setup(
    name="imgresume",
    version="0.1.0",
    description="Resumable upload of large image files through a load balancer "
    "to a pool of Twisted servers sharing one storage",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    author="The imgresume maintainers",
    keywords="upload resumable twisted load-balancer scanner images",
    classifiers=[
        "Development Status :: 4 - Beta",
        "Environment :: Console",
        "Framework :: Twisted",
        "Intended Audience :: System Administrators",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.11",
        "Topic :: Communications :: File Sharing",
        "Topic :: System :: Archiving",
        "Topic :: System :: Networking",
    ],
    # Examples to copy from (docs/server.md, docs/operations.md):
    # <prefix>/share/imgresume/tac/*.tac and .../examples/ (systemd units,
    # HAProxy configuration).
    data_files=[
        ("share/imgresume/tac", sorted(glob("tac/*.tac"))),
        ("share/imgresume/examples", sorted(glob("docs/examples/*.service"))
         + ["docs/examples/haproxy.cfg"]),
    ],
    # twisted.plugins is listed so that the drop-ins in twisted/plugins/ (a
    # directory without __init__.py, as Twisted requires) are installed.
    packages=find_packages(exclude=["tests", "tests.*", "bench", "bench.*"])
    + ["twisted.plugins"],
    # the browser upload page (--upload-page): plain files served as they are
    package_data={"imgresume.http": ["page/*.html", "page/*.js", "page/*.css"]},
    install_requires=[
        "Twisted[tls]>=24.7",
        "zope.interface>=6",
        "attrs>=23",
        "service-identity>=24",
        # The integrity algorithms (imgresume/integrity.py): CRC-32C with the
        # CPU's CRC instruction, BLAKE3; both release the GIL on large buffers.
        "crc32c>=2.4",
        "blake3>=0.4",
        "prometheus_client>=0.17",
        "rich>=13",
    ],
    extras_require={
        "s3": ["boto3>=1.28"],
        "test": ["pytest>=8", "pytest-twisted>=1.14", "hypothesis>=6", "boto3>=1.28",
                 "tuspy>=1.1", "selenium>=4.20"],
    },
    entry_points={"console_scripts": ["imgresume = imgresume.cli:main"]},
)
