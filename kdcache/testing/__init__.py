"""Support for tests and benchmarks, kept out of the library's way: a real S3 endpoint on loopback
(moto's server) and a TCP proxy that stages network faults in front of it (``s3_loopback``)."""
