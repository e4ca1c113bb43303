"""The one exception type of :mod:`metagrad.data`.

Every problem with data on disk (missing files, corrupt archives, wrong checksums, unexpected
class or image counts, undecodable images) is raised as :class:`DataError` with a one-line
message that names the offending file, so callers can catch a single type and users can act on
the message without a traceback. Programming errors (bad arguments) stay ``ValueError``.
"""

from ..errors import MetagradError


class DataError(MetagradError):
    """A dataset on disk is missing, incomplete or corrupt; the message names the file."""
