"""The hostile requests of the corpus: images, multipart, JSON, query fields and DICOM, each with the
documented status it must get.

The DICOM part holds each kind issue 10 found reaching a 500: tiny uploads that fall through to the
headerless reader (struct.error, BytesLengthException, NotImplementedError, OSError inside pydicom),
corrupt and truncated deflate streams, PALETTE COLOR without lookup tables, a VOI LUT with a 0-bit
descriptor, a Modality LUT without data, an unknown transfer syntax, malformed Rows; and the bombs
(`bomb=True`), whose memory the test watches.
"""

from __future__ import annotations

import base64
import json
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image
from pydicom.sequence import Sequence
from pydicom.uid import DeflatedExplicitVRLittleEndian

from tests.corpus import (
    MIB,
    deflate_bomb,
    deflated,
    encoded,
    explicit_le,
    headerless,
    j2k_frame_lying,
    jpeg_frame_lying,
    meta_bytes,
    modality_lut_without_data,
    modified,
    nested_deflate,
    palette_without_tables,
    part10,
    png_declaring,
    png_with_chunk_before_data,
    rle_zeros,
    segmented_palette_bomb,
    synthetic_ct,
    transfer_syntax,
    voi_lut_item,
    with_raw_element,
    zero_padded_deflate,
)

# The server's pixel limit: the RLE cases sit just at and just above it.
MAX_IMAGE_PIXELS = 4 * MIB
ROWS_TAG = 0x00280010


@dataclass(frozen=True)
class Case:
    name: str
    status: int
    path: str = "/vqa"
    files: dict[str, tuple[str, bytes, str]] | None = None
    data: dict[str, str] | None = None
    content: bytes | None = None
    params: dict[str, str] | list[tuple[str, str]] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    declared_length: int | None = None  # a Content-Length that is not the body's: sent through http.client
    bomb: bool = False  # part of the memory measurement


def image_case(name: str, image: bytes, status: int, bomb: bool = False, **fields: str) -> Case:
    return Case(
        name,
        status,
        files={"image": ("upload.bin", image, "application/octet-stream")},
        data={"question": "What is shown?", **fields},
        bomb=bomb,
    )


def raw_dicom_case(name: str, image: bytes, status: int, bomb: bool = False) -> Case:
    return Case(
        name,
        status,
        content=image,
        params={"question": "What is shown?"},
        headers={"content-type": "application/dicom"},
        bomb=bomb,
    )


def several_images_case(name: str, images: list[bytes], status: int) -> Case:
    """One multipart request of several images: a bomb among them is refused as it would be alone."""
    boundary = "several-images"
    parts = [
        b'Content-Disposition: form-data; name="image"; filename="a.bin"\r\n\r\n' + image for image in images
    ]
    parts.append(b'Content-Disposition: form-data; name="question"\r\n\r\nWhat is shown?')
    content = b"".join(b"--" + boundary.encode() + b"\r\n" + part + b"\r\n" for part in parts)
    return Case(
        name,
        status,
        content=content + b"--" + boundary.encode() + b"--\r\n",
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
        bomb=True,
    )


def json_case(name: str, body: object, status: int, path: str = "/vqa") -> Case:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return Case(name, status, path=path, content=content, headers={"content-type": "application/json"})


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def image_cases() -> list[Case]:
    png = encoded(Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64), dtype=np.uint8)), "PNG")
    jpeg = encoded(Image.new("RGB", (64, 64), (90, 90, 90)), "JPEG")
    tiff = encoded(Image.new("L", (64, 64), 7), "TIFF", compression="tiff_deflate")
    rng = np.random.default_rng(7)
    cases = [
        image_case("empty file", b"", 400),
        image_case("a text file", b"Report: no acute findings. Patient Jane Doe.\n", 400),
        image_case("1 KB of noise", rng.bytes(1024), 400),
        image_case("PNG signature then noise", b"\x89PNG\r\n\x1a\n" + rng.bytes(400), 400),
        image_case("JPEG markers then noise", b"\xff\xd8\xff\xe0" + rng.bytes(400), 400),
        image_case("corrupt JPEG scan", jpeg[:-200] + rng.bytes(150) + jpeg[-50:], 400),
        image_case("truncated TIFF", tiff[: len(tiff) // 2], 400),
        image_case("GIF, not accepted", encoded(Image.new("P", (64, 64)), "GIF"), 415),
        image_case("1x1 PNG", encoded(Image.new("L", (1, 1)), "PNG"), 422),
        image_case("PNG 8000x32, too elongated", encoded(Image.new("L", (8000, 32)), "PNG"), 422),
        image_case("PNG declaring 60000x60000", png_declaring(60_000, 60_000), 413, bomb=True),
        image_case("PNG bomb 10000x10000", png_declaring(10_000, 10_000), 413, bomb=True),
        image_case(
            "PNG zTXt bomb",
            png_with_chunk_before_data(b"zTXt", b"c\0\0" + zlib_zeros(8 * MIB)),
            400,
            bomb=True,
        ),
        image_case(
            "PNG iCCP bomb",
            png_with_chunk_before_data(b"iCCP", b"p\0\0" + zlib_zeros(8 * MIB)),
            400,
            bomb=True,
        ),
        image_case("PNG with a window", png, 422, window="lung"),
        image_case("PNG with a frame", png, 422, frame="2"),
    ]
    for cut in (20, 40, 60, 100, 200, 400):
        cases.append(image_case(f"PNG truncated at {cut} bytes", png[:cut], 400))
    for length in range(1, 9):
        cases.append(image_case(f"{length} random bytes", rng.bytes(length), 400))
    return cases


def zlib_zeros(size: int) -> bytes:
    return zlib.compress(b"\0" * size, 9)


def multipart_cases() -> list[Case]:
    png = encoded(Image.new("L", (64, 64), 3), "PNG")
    boundary = "corpus-boundary"

    def body(*parts: bytes, close: bool = True) -> bytes:
        joined = b"".join(b"--" + boundary.encode() + b"\r\n" + part + b"\r\n" for part in parts)
        return joined + (b"--" + boundary.encode() + b"--\r\n" if close else b"")

    image_part = b'Content-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n' + png
    question = b'Content-Disposition: form-data; name="question"\r\n\r\nWhat?'

    def caption(text: str) -> bytes:
        return b'Content-Disposition: form-data; name="caption"\r\n\r\n' + text.encode()

    multipart = {"content-type": f"multipart/form-data; boundary={boundary}"}
    return [
        Case(
            "multipart without boundary",
            400,
            content=body(image_part),
            headers={"content-type": "multipart/form-data"},
        ),
        Case(
            "multipart, wrong boundary",
            400,
            content=body(image_part, question).replace(b"corpus", b"other"),
            headers=multipart,
        ),
        Case("multipart part without headers", 400, content=body(b"\r\n" + png), headers=multipart),
        # Nine images of garbage: refused for their number (413), so none of them was decoded (400).
        Case(
            "multipart, nine images of a limit of eight",
            413,
            content=body(*[image_part.replace(png, b"not an image")] * 9, question),
            headers=multipart,
        ),
        Case(
            "multipart, captions not one per image",
            422,
            content=body(image_part, image_part, caption("frontal"), question),
            headers=multipart,
        ),
        Case(
            "multipart, a caption of 201 characters",
            422,
            content=body(image_part, caption("c" * 201), question),
            headers=multipart,
        ),
        Case(
            "multipart, question twice", 422, content=body(image_part, question, question), headers=multipart
        ),
        Case(
            "multipart, image as text",
            422,
            files={"x": ("a", b"", "text/plain")},
            data={"image": "abc", "question": "q"},
        ),
        Case(
            "multipart, other file part",
            422,
            files={"image": ("a.png", png, "image/png"), "other": ("b", b"x", "text/plain")},
            data={"question": "q"},
        ),
        Case("multipart, no image", 422, files={"other": ("b", b"x", "text/plain")}, data={"question": "q"}),
        Case(
            "multipart, 40 fields",
            400,
            files={"image": ("a.png", png, "image/png")},
            data={f"f{n}": "x" for n in range(40)},
        ),
        Case(
            "multipart, 100 KB field",
            400,
            files={"image": ("a.png", png, "image/png")},
            data={"question": "q" * 100_000},
        ),
        Case(
            "multipart, unknown field",
            422,
            files={"image": ("a.png", png, "image/png")},
            data={"question": "q", "colour": "red"},
        ),
        Case(
            "multipart, query fields too",
            422,
            files={"image": ("a.png", png, "image/png")},
            data={"question": "q"},
            params={"question": "q"},
        ),
        Case(
            "multipart, question empty",
            422,
            files={"image": ("a.png", png, "image/png")},
            data={"question": ""},
        ),
        Case(
            "multipart, question too long",
            422,
            files={"image": ("a.png", png, "image/png")},
            data={"question": "q" * 4001},
        ),
        Case(
            "multipart, target too long",
            422,
            path="/ground",
            files={"image": ("a.png", png, "image/png")},
            data={"target": "t" * 501},
        ),
        Case(
            "multipart, max_new_tokens 0",
            422,
            files={"image": ("a.png", png, "image/png")},
            data={"question": "q", "max_new_tokens": "0"},
        ),
        Case(
            "multipart, max_new_tokens text",
            422,
            files={"image": ("a.png", png, "image/png")},
            data={"question": "q", "max_new_tokens": "many"},
        ),
        Case(
            "multipart, frame -1",
            422,
            files={"image": ("a.png", png, "image/png")},
            data={"question": "q", "frame": "-1"},
        ),
        Case(
            "multipart, frame huge",
            422,
            files={"image": ("a.png", png, "image/png")},
            data={"question": "q", "frame": "9" * 40},
        ),
        Case("multipart, unterminated", 422, content=body(image_part, close=False)[:-4], headers=multipart),
        Case(
            "declared length beyond the limit",
            413,
            content=b"{}",
            headers={"content-type": "application/json"},
            declared_length=10**12,
        ),
        Case("no content type", 415, content=png),
        Case("text/plain body", 415, content=png, headers={"content-type": "text/plain"}),
    ]


def json_cases() -> list[Case]:
    image = b64(encoded(Image.new("L", (64, 64), 3), "PNG"))
    return [
        json_case("empty JSON body", b"", 400),
        json_case("JSON cut short", b'{"image": "', 400),
        json_case("JSON not UTF-8", b'{"image": "\xff\xfe"}', 400),
        json_case("JSON nested 100000 deep", b"[" * 100_000 + b"]" * 100_000, 400),
        json_case("JSON array", [image, "q"], 422),
        json_case("JSON string", "image", 422),
        json_case("JSON null", None, 422),
        json_case("JSON without image", {"question": "q"}, 422),
        json_case("JSON image a number", {"image": 42, "question": "q"}, 422),
        json_case("JSON image an object", {"image": {"b64": image}, "question": "q"}, 422),
        json_case("JSON image not base64", {"image": "not base64 at all!", "question": "q"}, 422),
        json_case("JSON image empty", {"image": "", "question": "q"}, 400),
        json_case("JSON data URI not base64", {"image": "data:image/png,raw", "question": "q"}, 422),
        json_case(
            "JSON base64 of noise", {"image": b64(np.random.default_rng(3).bytes(500)), "question": "q"}, 400
        ),
        json_case(
            "JSON nine images of a limit of eight", {"images": ["not base64!"] * 9, "question": "q"}, 413
        ),
        json_case("JSON image and images", {"image": image, "images": [image], "question": "q"}, 422),
        json_case("JSON images empty", {"images": [], "question": "q"}, 422),
        json_case("JSON images not a list", {"images": image, "question": "q"}, 422),
        json_case("JSON images item a number", {"images": [image, 7], "question": "q"}, 422),
        json_case(
            "JSON images item with an unknown key",
            {"images": [{"image": image, "frame": 2}], "question": "q"},
            422,
        ),
        json_case(
            "JSON images caption a number", {"images": [{"image": image, "caption": 3}], "question": "q"}, 422
        ),
        json_case("JSON question a list", {"image": image, "question": ["q"]}, 422),
        json_case("JSON question a number", {"image": image, "question": 5}, 422),
        json_case("JSON unknown field", {"image": image, "question": "q", "qustion": "typo"}, 422),
        json_case("JSON frame a string", {"image": image, "question": "q", "frame": "first"}, 422),
        json_case("JSON frame a float", {"image": image, "question": "q", "frame": 1.5}, 422),
        json_case("JSON frame overflowing", {"image": image, "question": "q", "frame": 10**40}, 422),
        json_case("JSON window malformed", {"image": image, "question": "q", "window": "40;400"}, 422),
        json_case(
            "JSON max_new_tokens negative", {"image": image, "question": "q", "max_new_tokens": -5}, 422
        ),
        json_case(
            "JSON max_new_tokens beyond the server's",
            {"image": image, "question": "q", "max_new_tokens": 10**6},
            422,
        ),
        json_case(
            "JSON indication too long", {"image": image, "indication": "i" * 4001}, 422, path="/report"
        ),
        json_case("JSON modality too long", {"image": image, "modality": "m" * 65}, 422, path="/report"),
        Case(
            "JSON with query fields",
            422,
            content=json.dumps({"image": image}).encode(),
            params={"question": "q"},
            headers={"content-type": "application/json"},
        ),
    ]


def query_cases() -> list[Case]:
    ct = part10(synthetic_ct())
    dicom = {"content-type": "application/dicom"}
    return [
        Case("query, no question", 422, content=ct, headers=dicom),
        Case(
            "query, question twice",
            422,
            content=ct,
            params=[("question", "a"), ("question", "b")],
            headers=dicom,
        ),
        Case(
            "query, frame text", 422, content=ct, params={"question": "q", "frame": "middle"}, headers=dicom
        ),
        Case("query, frame 0", 422, content=ct, params={"question": "q", "frame": "0"}, headers=dicom),
        Case("query, frame 2 of 1", 422, content=ct, params={"question": "q", "frame": "2"}, headers=dicom),
        Case(
            "query, window unknown preset",
            422,
            content=ct,
            params={"question": "q", "window": "kidney"},
            headers=dicom,
        ),
        Case(
            "query, window width 0",
            422,
            content=ct,
            params={"question": "q", "window": "40,0"},
            headers=dicom,
        ),
        Case(
            "query, unknown parameter",
            422,
            content=ct,
            params={"question": "q", "color": "red"},
            headers=dicom,
        ),
        Case(
            "query, max_new_tokens float",
            422,
            content=ct,
            params={"question": "q", "max_new_tokens": "2.5"},
            headers=dicom,
        ),
        Case("query, empty DICOM body", 400, content=b"", params={"question": "q"}, headers=dicom),
        Case(
            "query, PNG sent as DICOM with a window",
            422,
            content=encoded(Image.new("L", (64, 64)), "PNG"),
            params={"question": "q", "window": "lung"},
            headers=dicom,
        ),
    ]


def dicom_cases() -> list[Case]:
    ct = part10(synthetic_ct())
    small = encoded(Image.new("L", (64, 64), 3), "PNG")
    deflated_ct = meta_bytes(DeflatedExplicitVRLittleEndian) + deflated(explicit_le(synthetic_ct()))
    meta_length = len(meta_bytes(DeflatedExplicitVRLittleEndian))
    stream = deflated_ct[meta_length:]
    rng = np.random.default_rng(11)
    return [
        # Tiny uploads that begin like a dataset without its Part 10 header: each once raised inside pydicom
        # (struct.error, pydicom's BytesLengthException, NotImplementedError, OSError).
        image_case("headerless: element cut short", b"\x08\x00\x16\x00UI\x40\x00ab", 400),
        image_case("headerless: US of odd length", b"\x02\x00\x02\x00US\xff\xff\xd3\x08\x00\x00\x00", 400),
        image_case("headerless: unknown VR", b"\x08\x00\x16\x00XX\x00\x00\xfc\xe0\x7f\x10\x00", 400),
        image_case(
            "headerless: sequence item without tag", b"\x08\x00\x16\x00SQ\x00\x00\x02\x00\x00\x00\xbc/", 400
        ),
        image_case("headerless: meta only", b"\x02\x00\x10\x00UI\x04\x001.2\x00", 400),
        image_case("headerless: group 0008 then noise", b"\x08\x00" + rng.bytes(300), 400),
        image_case("headerless implicit VR CT decodes", headerless(synthetic_ct(), implicit_vr=True), 200),
        image_case("Part 10 'DICM' then noise", b"\0" * 128 + b"DICM" + rng.bytes(300), 422),
        image_case("Part 10 truncated in its meta", ct[:150], 422),
        image_case("Part 10 pixel data cut short", ct[: len(ct) - 4000], 400),
        raw_dicom_case(
            "deflate: corrupt stream",
            deflated_ct[:meta_length] + stream[:20] + rng.bytes(60) + stream[80:],
            400,
        ),
        raw_dicom_case("deflate: truncated stream", deflated_ct[: meta_length + len(stream) // 2], 400),
        raw_dicom_case("deflate: bomb, 2 MB to 2 GiB", deflate_bomb(2048 * MIB), 413, bomb=True),
        several_images_case(
            "deflate: bomb as the 5th of 6 images",
            [small, small, small, small, deflate_bomb(2048 * MIB), small],
            413,
        ),
        several_images_case(
            "PNG bomb as the 2nd of 3 images", [small, png_declaring(60_000, 60_000), small], 413
        ),
        # Each at the server's pixel limit, together over its budget for a request (MEDMO_MAX_TOTAL_PIXELS).
        several_images_case(
            "two images over the total pixel budget", [rle_zeros(2048, 2048), rle_zeros(2048, 2048)], 413
        ),
        raw_dicom_case(
            "deflate: padded with 1 GiB of zeros", zero_padded_deflate(1024 * MIB), 413, bomb=True
        ),
        raw_dicom_case("deflate: nested File Meta", nested_deflate(), 422, bomb=True),
        raw_dicom_case("deflate: well-formed decodes", deflated_ct, 200),
        image_case("JPEG frame declaring 60000x60000", jpeg_frame_lying(64, 60_000), 400, bomb=True),
        image_case("JPEG 2000 frame declaring 60000x60000", j2k_frame_lying(64, 60_000), 400, bomb=True),
        image_case("JPEG frame declaring 32x32 in 64x64", jpeg_frame_lying(64, 32), 400),
        image_case("JPEG frame and header 60000x60000", jpeg_frame_lying(60_000, 60_000), 413, bomb=True),
        image_case("RLE at the pixel limit (2048x2048 zeros)", rle_zeros(2048, 2048), 200, bomb=True),
        image_case("RLE above the pixel limit (2049x2048 zeros)", rle_zeros(2049, 2048), 413, bomb=True),
        image_case("PALETTE COLOR without lookup tables", modified(palette_without_tables), 400),
        image_case("PALETTE COLOR segmented tables bomb", modified(segmented_palette_bomb), 400, bomb=True),
        image_case(
            "VOI LUT with a 0-bit descriptor",
            modified(lambda d: setattr(d, "VOILUTSequence", Sequence([voi_lut_item(0)]))),
            400,
        ),
        image_case(
            "VOI LUT 0-bit, window given",
            modified(lambda d: setattr(d, "VOILUTSequence", Sequence([voi_lut_item(0)]))),
            200,
            window="lung",
        ),
        image_case("Modality LUT without data", modified(modality_lut_without_data), 400),
        image_case("transfer syntax MPEG-2", modified(transfer_syntax("1.2.840.10008.1.2.4.100")), 415),
        image_case(
            "transfer syntax unregistered", meta_bytes("1.2.3.4.5") + explicit_le(synthetic_ct()), 415
        ),
        image_case("Rows missing", modified(lambda d: delattr(d, "Rows")), 400),
        image_case("Rows 0", with_raw_element(ct, ROWS_TAG, b"US", b"\x00\x00"), 400),
        image_case("Rows one byte long", with_raw_element(ct, ROWS_TAG, b"US", b"\x01"), 400),
        image_case("Rows empty", with_raw_element(ct, ROWS_TAG, b"US", b""), 400),
        image_case("Rows two values", with_raw_element(ct, ROWS_TAG, b"US", b"\x40\x00\x40\x00"), 400),
        image_case("Rows 65535, pixel data short", with_raw_element(ct, ROWS_TAG, b"US", b"\xff\xff"), 400),
        image_case("frames over the limit", modified(lambda d: setattr(d, "NumberOfFrames", 20_000)), 413),
        image_case("4 samples per pixel", modified(lambda d: setattr(d, "SamplesPerPixel", 4)), 415),
        image_case("12 bits allocated", modified(lambda d: setattr(d, "BitsAllocated", 12)), 400),
        image_case(
            "photometric interpretation missing",
            modified(lambda d: delattr(d, "PhotometricInterpretation")),
            400,
        ),
        image_case(
            "photometric interpretation unknown",
            modified(lambda d: setattr(d, "PhotometricInterpretation", "CMYK")),
            415,
        ),
        image_case("no pixel data", modified(lambda d: delattr(d, "PixelData")), 422),
        image_case("window on a colour image", modified(colour), 422, window="lung"),
        Case(
            "Structured Report for a source without a study",
            422,
            path="/report",
            files={"image": ("a", modified(lambda d: delattr(d, "StudyInstanceUID")), "application/dicom")},
            headers={"accept": "application/dicom"},
        ),
        Case(
            "Structured Report for a source without a patient",
            422,
            path="/report",
            files={"image": ("a", modified(without_patient), "application/dicom")},
            headers={"accept": "application/dicom"},
        ),
        Case(
            "Structured Report for a complete source",
            200,
            path="/report",
            files={"image": ("a", ct, "application/dicom")},
            headers={"accept": "application/dicom"},
        ),
        Case(
            "Structured Report for a PNG",
            406,
            path="/report",
            files={"image": ("a", encoded(Image.new("L", (64, 64)), "PNG"), "image/png")},
            headers={"accept": "application/dicom"},
        ),
    ]


def colour(dataset: Any) -> None:
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation, dataset.PlanarConfiguration = 3, "RGB", 0
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 8, 8, 7, 0
    dataset.PixelData = np.zeros((64, 64, 3), dtype=np.uint8).tobytes()


def without_patient(dataset: Any) -> None:
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"):
        delattr(dataset, keyword)


CASES = [*image_cases(), *multipart_cases(), *json_cases(), *query_cases(), *dicom_cases()]
