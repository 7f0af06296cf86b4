"""What can be wrong with an uploaded image. The API layer maps each to an HTTP status."""


class ImageError(ValueError):
    """Base class: the message is safe to show to the client (it never contains pixel or patient data)."""


class UnreadableImageError(ImageError):
    """The bytes are not an image this service can read (corrupt, truncated, empty, or not an image at all)."""


class UnsupportedImageError(ImageError):
    """The bytes are a recognised format or object that this service does not accept."""


class ImageTooLargeError(ImageError):
    """The file or its decoded pixels exceed the configured limits (decompression bombs end here)."""


class TooManyPixelsError(ImageTooLargeError):
    """The decoded picture would hold more pixels than allowed (`pixels` says how many)."""

    def __init__(self, message: str, pixels: int) -> None:
        super().__init__(message)
        self.pixels = pixels


class UnusableImageError(ImageError):
    """The image decodes but cannot be fed to the model (too small, extreme aspect ratio, bad frame...)."""


class DecodingCancelledError(Exception):
    """The request that wanted this upload decoded is gone (client disconnected, deadline passed).

    Not an ImageError: nobody is waiting for the answer, so it never becomes a response.
    """
