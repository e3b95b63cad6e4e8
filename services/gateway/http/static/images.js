// Pictures attached to a message: checked here before upload (format from the file's own
// bytes, size in bytes and pixels, how many per message), sent as OpenAI content parts with
// data URLs, and read back from stored messages. The gateway checks everything again; these
// checks only spare the user an upload that would be refused.

/** The formats the model plane decodes (model/image_input.py), by MIME type. */
export const IMAGE_TYPES = ["image/png", "image/jpeg", "image/webp", "image/gif"];
export const ACCEPT = IMAGE_TYPES.join(",");

/**
 * Limits used when the gateway does not announce its own (see `limitsFrom`): the defaults of
 * the gateway's Settings of the same names (max_image_bytes, max_image_pixels,
 * max_images_per_message, max_image_request_bytes).
 */
export const DEFAULT_LIMITS = Object.freeze({
  maxBytes: 10 * 1024 * 1024, // one picture, as uploaded
  maxPixels: 16_000_000, // one picture, width x height
  maxImages: 4, // pictures in one message
  maxTotalBytes: 16 * 1024 * 1024, // all pictures of one message together
});

/**
 * The limits the gateway announces on its model card (`GET /v1/models`), falling back to
 * DEFAULT_LIMITS field by field. Fields read: `max_image_bytes`, `max_image_pixels`,
 * `max_images_per_message`, `max_image_request_bytes`.
 */
export function limitsFrom(card) {
  const pick = (value, fallback) => (Number.isInteger(value) && value > 0 ? value : fallback);
  return Object.freeze({
    maxBytes: pick(card?.max_image_bytes, DEFAULT_LIMITS.maxBytes),
    maxPixels: pick(card?.max_image_pixels, DEFAULT_LIMITS.maxPixels),
    maxImages: pick(card?.max_images_per_message, DEFAULT_LIMITS.maxImages),
    maxTotalBytes: pick(card?.max_image_request_bytes, DEFAULT_LIMITS.maxTotalBytes),
  });
}

/** A problem with one file, worded for the user (what is wrong and what to do). */
export class ImageError extends Error {
  constructor(message) {
    super(message);
    this.name = "ImageError";
  }
}

const startsWith = (bytes, prefix, at = 0) => prefix.every((b, i) => bytes[at + i] === b);
const ascii = (text) => [...text].map((c) => c.charCodeAt(0));

/** The image type its first bytes say, whatever the file name or browser claim; or null. */
export function sniffType(bytes) {
  if (startsWith(bytes, [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a])) return "image/png";
  if (startsWith(bytes, [0xff, 0xd8, 0xff])) return "image/jpeg";
  if (startsWith(bytes, ascii("GIF87a")) || startsWith(bytes, ascii("GIF89a"))) return "image/gif";
  if (startsWith(bytes, ascii("RIFF")) && startsWith(bytes, ascii("WEBP"), 8)) return "image/webp";
  return null;
}

const be16 = (b, i) => (b[i] << 8) | b[i + 1];
const le16 = (b, i) => b[i] | (b[i + 1] << 8);
const le24 = (b, i) => b[i] | (b[i + 1] << 8) | (b[i + 2] << 16);
const be32 = (b, i) => ((b[i] << 24) >>> 0) + ((b[i + 1] << 16) | (b[i + 2] << 8) | b[i + 3]);

/**
 * Width and height from the file's header, without decoding it (so a decompression bomb is
 * refused before the browser spends memory on it); null when the header is not understood.
 */
export function imageSize(bytes, type) {
  if (type === "image/png" && bytes.length >= 24) {
    return { width: be32(bytes, 16), height: be32(bytes, 20) };
  }
  if (type === "image/gif" && bytes.length >= 10) {
    return { width: le16(bytes, 6), height: le16(bytes, 8) };
  }
  if (type === "image/webp" && bytes.length >= 30) {
    const chunk = String.fromCharCode(...bytes.slice(12, 16));
    if (chunk === "VP8X") return { width: le24(bytes, 24) + 1, height: le24(bytes, 27) + 1 };
    if (chunk === "VP8L") {
      const bits = bytes[21] | (bytes[22] << 8) | (bytes[23] << 16) | (bytes[24] << 24);
      return { width: (bits & 0x3fff) + 1, height: ((bits >>> 14) & 0x3fff) + 1 };
    }
    if (chunk === "VP8 ") return { width: le16(bytes, 26) & 0x3fff, height: le16(bytes, 28) & 0x3fff };
    return null;
  }
  if (type === "image/jpeg") {
    // Walk the marker segments to the first start-of-frame (SOF0..SOF15 but DHT, JPG, DAC).
    let i = 2;
    while (i + 9 < bytes.length) {
      if (bytes[i] !== 0xff) return null;
      const marker = bytes[i + 1];
      if (marker === 0xff) {
        i += 1; // fill byte
        continue;
      }
      if (marker >= 0xc0 && marker <= 0xcf && ![0xc4, 0xc8, 0xcc].includes(marker)) {
        return { width: be16(bytes, i + 7), height: be16(bytes, i + 5) };
      }
      i += 2 + be16(bytes, i + 2);
    }
  }
  return null;
}

const MB = 1024 * 1024;
export const formatBytes = (n) =>
  n >= MB ? `${(n / MB).toFixed(1).replace(/\.0$/, "")} MB` : `${Math.ceil(n / 1024)} KB`;
const formatPixels = (n) => `${(n / 1e6).toFixed(1).replace(/\.0$/, "")} megapixels`;

function readBytes(file, count) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(new Uint8Array(reader.result));
    reader.onerror = () => reject(reader.error);
    reader.readAsArrayBuffer(count === undefined ? file : file.slice(0, count));
  });
}

function toBase64(bytes) {
  // btoa takes a binary string; build it in slices (a spread of 10 MB overflows the stack).
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(binary);
}

/** The name a file is shown with (a pasted screenshot has a generic one, or none). */
export const displayName = (file) => file.name || "pasted image";

/**
 * Whether `file` may join the pictures already attached (`attached`: their sizes in bytes);
 * throws ImageError saying why not.
 */
export function checkRoom(file, attached, limits = DEFAULT_LIMITS) {
  const { maxImages, maxTotalBytes } = limits;
  const name = displayName(file);
  if (attached.length >= maxImages) {
    throw new ImageError(
      `A message can carry at most ${maxImages} picture${maxImages === 1 ? "" : "s"}; ` +
        `"${name}" was not added.`,
    );
  }
  const total = attached.reduce((sum, size) => sum + size, 0) + file.size;
  if (total > maxTotalBytes) {
    throw new ImageError(
      `"${name}" would bring this message's pictures to ${formatBytes(total)}; together ` +
        `they can be at most ${formatBytes(maxTotalBytes)}. Send it in another message.`,
    );
  }
}

/**
 * Check one file and read it: {name, type, size, width, height, url} with a data URL whose
 * type is the one its bytes say. Throws ImageError with a message for the user.
 */
export async function readImage(file, limits = DEFAULT_LIMITS) {
  const name = displayName(file);
  if (file.size === 0) throw new ImageError(`"${name}" is empty: choose another file.`);
  const allowed = "Use a PNG, JPEG, WebP or GIF image.";
  if (file.size > limits.maxBytes) {
    throw new ImageError(
      `"${name}" is ${formatBytes(file.size)}; an image can be at most ` +
        `${formatBytes(limits.maxBytes)}. Send a smaller or more compressed one.`,
    );
  }
  let bytes;
  try {
    bytes = await readBytes(file);
  } catch {
    throw new ImageError(`"${name}" could not be read: choose it again.`);
  }
  const type = sniffType(bytes);
  if (type === null) throw new ImageError(`"${name}" is not an image the model can read. ${allowed}`);
  const size = imageSize(bytes, type);
  if (size && size.width * size.height > limits.maxPixels) {
    throw new ImageError(
      `"${name}" is ${size.width}×${size.height} pixels (${formatPixels(size.width * size.height)}); ` +
        `an image can have at most ${formatPixels(limits.maxPixels)}. Scale it down and try again.`,
    );
  }
  return {
    name,
    type,
    size: file.size,
    width: size?.width ?? null,
    height: size?.height ?? null,
    url: `data:${type};base64,${toBase64(bytes)}`,
  };
}

/**
 * The `content` of a user turn: a plain string without pictures (as before), else content
 * parts with the pictures first, as DeepSeek-VL2's conversations place them
 * ("<image>\n{question}").
 */
export function turnContent(text, images) {
  if (!images.length) return text;
  const parts = images.map((image) => ({ type: "image_url", image_url: { url: image.url } }));
  if (text.trim()) parts.push({ type: "text", text });
  return parts;
}

const SHOWN_URL = /^data:image\/(png|jpeg|webp|gif);base64,[A-Za-z0-9+/=\s]+$/;

/**
 * A stored message's content as {text, images: [url | null]}: a plain string, or content
 * parts. Only data URLs of the four formats are shown (null otherwise): the page never makes
 * the browser fetch a picture from elsewhere.
 */
export function splitContent(content) {
  if (typeof content === "string") return { text: content, images: [] };
  if (!Array.isArray(content)) return { text: "", images: [] };
  const texts = [];
  const images = [];
  for (const part of content) {
    if (part?.type === "text" && typeof part.text === "string") texts.push(part.text);
    else if (part?.type === "image_url") {
      const url = typeof part.image_url === "string" ? part.image_url : part.image_url?.url;
      images.push(typeof url === "string" && SHOWN_URL.test(url) ? url : null);
    }
  }
  return { text: texts.join("\n"), images };
}

/** The files of a paste or drop that are worth trying (non-files such as text are skipped). */
export function filesOf(dataTransfer) {
  if (!dataTransfer) return [];
  const files = [...(dataTransfer.files || [])];
  if (files.length) return files;
  return [...(dataTransfer.items || [])]
    .filter((item) => item.kind === "file")
    .map((item) => item.getAsFile())
    .filter(Boolean);
}
