"""The PROXY protocol (HAProxy's specification, versions 1 and 2): a pure codec.

See halb.proxy.codec for building and parsing headers under the receiver rules of the
specification; halb.proxy.crc32c for the checksum its CRC32C TLV carries.
"""
