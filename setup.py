"""Packaging for imgresume: the library, the ``imgresume`` console script and
the twistd plugins ``imgresume`` (server) and ``imgresume-lb`` (balancer)."""

from setuptools import find_packages, setup

setup(
    name="imgresume",
    version="0.1.0",
    description="Resumable upload of large image files through a load balancer "
    "to a pool of Twisted servers sharing one storage",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
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
    ],
    extras_require={
        "s3": ["boto3>=1.28"],
        "test": ["pytest>=8", "pytest-twisted>=1.14", "hypothesis>=6", "boto3>=1.28",
                 "tuspy>=1.1", "selenium>=4.20"],
    },
    entry_points={"console_scripts": ["imgresume = imgresume.cli:main"]},
)
