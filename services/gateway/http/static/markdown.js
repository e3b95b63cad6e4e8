// A small Markdown renderer for chat replies that builds DOM nodes directly.
//
// Model output and session titles are untrusted: nothing here ever parses a string as HTML.
// Every piece of text becomes a Text node (or an element's textContent), so `<script>` or
// `<img onerror=...>` in a reply is shown as the characters it is. Links are kept only for
// http(s) and mailto URLs. The renderer is forgiving by design: it runs on every streamed
// delta, so an unterminated code fence or emphasis simply renders as far as it has come.

const ESCAPABLE = /[\\`*_{}[\]()#+\-.!|>~<"'&]/;
const FENCE_OPEN = /^ {0,3}(`{3,}|~{3,})[ \t]*([^`\s]*)[^`]*$/;
const HEADING = /^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$/;
const RULE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
const QUOTE = /^ {0,3}> ?/;
const LIST_ITEM = /^( {0,3})([-*+]|\d{1,9}[.)])([ \t]+|$)/;
const TABLE_SEPARATOR = /^ {0,3}\|?[ \t]*:?-+:?[ \t]*(?:\|[ \t]*:?-+:?[ \t]*)*\|?[ \t]*$/;
const SAFE_PROTOCOLS = new Set(["http:", "https:", "mailto:"]);
const LANGUAGE = /^[\w+#.-]{1,32}$/;

function el(tag, className) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  return node;
}

/** Render Markdown text into a DocumentFragment of safe DOM nodes. */
export function renderMarkdown(source) {
  const fragment = document.createDocumentFragment();
  const lines = String(source ?? "")
    .replace(/\r\n?/g, "\n")
    .split("\n");
  renderBlocks(lines, fragment, 0);
  return fragment;
}

function isBlockStart(line) {
  return (
    FENCE_OPEN.test(line) ||
    HEADING.test(line) ||
    RULE.test(line) ||
    QUOTE.test(line) ||
    LIST_ITEM.test(line)
  );
}

function renderBlocks(lines, parent, depth) {
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (!line.trim()) {
      i += 1;
      continue;
    }
    const fence = FENCE_OPEN.exec(line);
    if (fence) {
      i = renderCodeBlock(lines, i, fence, parent);
      continue;
    }
    const heading = HEADING.exec(line);
    if (heading) {
      const h = el(`h${heading[1].length}`);
      appendInline(h, heading[2] ?? "");
      parent.append(h);
      i += 1;
      continue;
    }
    if (RULE.test(line)) {
      parent.append(el("hr"));
      i += 1;
      continue;
    }
    if (QUOTE.test(line) && depth < 8) {
      const inner = [];
      while (i < lines.length && lines[i].trim() && QUOTE.test(lines[i])) {
        inner.push(lines[i].replace(QUOTE, ""));
        i += 1;
      }
      const quote = el("blockquote");
      renderBlocks(inner, quote, depth + 1);
      parent.append(quote);
      continue;
    }
    if (LIST_ITEM.test(line) && depth < 8) {
      i = renderList(lines, i, parent, depth);
      continue;
    }
    if (line.includes("|") && i + 1 < lines.length && TABLE_SEPARATOR.test(lines[i + 1])) {
      i = renderTable(lines, i, parent);
      continue;
    }
    // Paragraph: runs until a blank line or the start of another block.
    const paragraph = [line.trim()];
    i += 1;
    while (i < lines.length && lines[i].trim() && !isBlockStart(lines[i])) {
      paragraph.push(lines[i].trim());
      i += 1;
    }
    const p = el("p");
    paragraph.forEach((text, index) => {
      // Chat replies use single newlines as real line breaks.
      if (index > 0) p.append(el("br"));
      appendInline(p, text);
    });
    parent.append(p);
  }
}

function renderCodeBlock(lines, start, fence, parent) {
  const marker = fence[1];
  const close = new RegExp(`^ {0,3}${marker[0] === "`" ? "`" : "~"}{${marker.length},}[ \\t]*$`);
  const body = [];
  let i = start + 1;
  // An unterminated fence (reply still streaming) runs to the end of the text.
  while (i < lines.length && !close.test(lines[i])) {
    body.push(lines[i]);
    i += 1;
  }
  const wrapper = el("div", "code-block");
  const bar = el("div", "code-bar");
  const language = LANGUAGE.test(fence[2]) ? fence[2] : "";
  const label = el("span", "code-lang");
  label.textContent = language || "code";
  const copy = el("button", "code-copy");
  copy.type = "button";
  copy.textContent = "Copy";
  bar.append(label, copy);
  const pre = el("pre");
  const code = el("code");
  if (language) code.className = `language-${language}`;
  code.textContent = body.join("\n");
  pre.append(code);
  wrapper.append(bar, pre);
  parent.append(wrapper);
  return i + 1;
}

function renderList(lines, start, parent, depth) {
  const first = LIST_ITEM.exec(lines[start]);
  const ordered = /\d/.test(first[2]);
  const list = el(ordered ? "ol" : "ul");
  if (ordered) {
    const number = Number.parseInt(first[2], 10);
    if (number !== 1) list.start = number;
  }
  let i = start;
  let loose = false;
  const items = [];
  while (i < lines.length) {
    const match = LIST_ITEM.exec(lines[i]);
    if (!match || /\d/.test(match[2]) !== ordered) break;
    const indent = match[0].length;
    const body = [lines[i].slice(indent)];
    i += 1;
    // Continuation: indented lines, or lazy lines that do not start a new block.
    while (i < lines.length) {
      const next = lines[i];
      if (!next.trim()) {
        const following = lines[i + 1];
        if (following !== undefined && /^[ \t]{2,}\S/.test(following)) {
          body.push("");
          loose = true;
          i += 1;
          continue;
        }
        break;
      }
      if (/^[ \t]{2,}/.test(next)) {
        body.push(next.replace(new RegExp(`^[ \\t]{1,${Math.max(indent, 2)}}`), ""));
      } else if (!isBlockStart(next)) {
        body.push(next.trim());
      } else {
        break;
      }
      i += 1;
    }
    items.push(body);
    // A blank line between items makes the list loose (paragraphs kept).
    if (i < lines.length && !lines[i].trim() && LIST_ITEM.test(lines[i + 1] ?? "")) {
      const nextMatch = LIST_ITEM.exec(lines[i + 1]);
      if (/\d/.test(nextMatch[2]) === ordered && nextMatch[1].length <= first[1].length + 1) {
        loose = true;
        i += 1;
      }
    }
  }
  for (const body of items) {
    const li = el("li");
    renderBlocks(body, li, depth + 1);
    // Tight lists show their text without paragraph margins.
    if (!loose && li.firstChild && li.firstChild.nodeName === "P") {
      const p = li.firstChild;
      while (p.firstChild) li.insertBefore(p.firstChild, p);
      p.remove();
    }
    list.append(li);
  }
  parent.append(list);
  return i;
}

function splitRow(line) {
  let text = line.trim();
  if (text.startsWith("|")) text = text.slice(1);
  if (text.endsWith("|") && !text.endsWith("\\|")) text = text.slice(0, -1);
  const cells = [];
  let cell = "";
  for (let k = 0; k < text.length; k += 1) {
    if (text[k] === "\\" && text[k + 1] === "|") {
      cell += "|";
      k += 1;
    } else if (text[k] === "|") {
      cells.push(cell.trim());
      cell = "";
    } else {
      cell += text[k];
    }
  }
  cells.push(cell.trim());
  return cells;
}

function renderTable(lines, start, parent) {
  const header = splitRow(lines[start]);
  const aligns = splitRow(lines[start + 1]).map((spec) => {
    if (spec.startsWith(":") && spec.endsWith(":")) return "center";
    if (spec.endsWith(":")) return "right";
    if (spec.startsWith(":")) return "left";
    return "";
  });
  const wrapper = el("div", "table-wrap");
  const table = el("table");
  const thead = el("thead");
  const headRow = el("tr");
  header.forEach((text, column) => {
    const th = el("th");
    if (aligns[column]) th.className = `align-${aligns[column]}`;
    appendInline(th, text);
    headRow.append(th);
  });
  thead.append(headRow);
  const tbody = el("tbody");
  let i = start + 2;
  while (i < lines.length && lines[i].trim() && lines[i].includes("|")) {
    const row = el("tr");
    const cells = splitRow(lines[i]);
    for (let column = 0; column < header.length; column += 1) {
      const td = el("td");
      if (aligns[column]) td.className = `align-${aligns[column]}`;
      appendInline(td, cells[column] ?? "");
      row.append(td);
    }
    tbody.append(row);
    i += 1;
  }
  table.append(thead, tbody);
  wrapper.append(table);
  parent.append(wrapper);
  return i;
}

/** A link target we are willing to make clickable, or null. */
export function safeUrl(raw) {
  try {
    const url = new URL(raw, window.location.href);
    return SAFE_PROTOCOLS.has(url.protocol) ? url.href : null;
  } catch {
    return null;
  }
}

/** A link that opens in a new tab and gives the target no handle on this page. */
function externalLink(href) {
  const a = el("a");
  a.href = href;
  a.target = "_blank";
  a.rel = "noopener noreferrer nofollow";
  return a;
}

function isWordChar(ch) {
  return ch !== undefined && /[\p{L}\p{N}_]/u.test(ch);
}

function findClosing(text, delimiter, from) {
  let at = text.indexOf(delimiter, from);
  while (at !== -1) {
    // The closing delimiter must not follow whitespace ("a * b * c" is not emphasis).
    if (at > from && !/\s/.test(text[at - 1])) {
      // Underscores close only at a word's end (not in `window.__name` or snake_case).
      if (delimiter[0] !== "_" || !isWordChar(text[at + delimiter.length])) return at;
    }
    at = text.indexOf(delimiter, at + 1);
  }
  return -1;
}

const EMPHASIS = [
  ["**", "strong"],
  ["__", "strong"],
  ["~~", "del"],
  ["*", "em"],
  ["_", "em"],
];
const LINK = /^\[([^\]\n]+)\]\(\s*<?([^\s<>()]+(?:\([^\s<>()]*\))?[^\s<>()]*)>?(?:\s+"[^"\n]*")?\s*\)/;
const AUTOLINK = /^https?:\/\/[^\s<>"]*[^\s<>"'.,;:!?)\]]/;

/** Append inline Markdown (code, emphasis, links) of one line or cell as safe nodes. */
export function appendInline(parent, text, nesting = 0) {
  let plain = "";
  const flush = () => {
    if (plain) parent.append(document.createTextNode(plain));
    plain = "";
  };
  let i = 0;
  outer: while (i < text.length) {
    const ch = text[i];
    if (ch === "\\" && ESCAPABLE.test(text[i + 1] ?? "")) {
      plain += text[i + 1];
      i += 2;
      continue;
    }
    if (ch === "`") {
      const run = /^`+/.exec(text.slice(i))[0];
      let end = text.indexOf(run, i + run.length);
      while (end !== -1 && text[end + run.length] === "`") {
        end = text.indexOf(run, end + run.length + 1);
      }
      if (end !== -1) {
        flush();
        const code = el("code");
        let content = text.slice(i + run.length, end);
        if (/^ .*[^ ].* $/.test(content)) content = content.slice(1, -1);
        code.textContent = content;
        parent.append(code);
        i = end + run.length;
        continue;
      }
      plain += run;
      i += run.length;
      continue;
    }
    if ((ch === "*" || ch === "_" || ch === "~") && nesting < 6) {
      for (const [delimiter, tag] of EMPHASIS) {
        if (!text.startsWith(delimiter, i)) continue;
        // Intra-word underscores (snake_case) are not emphasis.
        if (delimiter[0] === "_" && isWordChar(text[i - 1])) continue;
        const inner = i + delimiter.length;
        if (inner >= text.length || /\s/.test(text[inner])) continue;
        const close = findClosing(text, delimiter, inner);
        if (close === -1) continue;
        flush();
        const node = el(tag);
        appendInline(node, text.slice(inner, close), nesting + 1);
        parent.append(node);
        i = close + delimiter.length;
        continue outer;
      }
    }
    if (ch === "[" && nesting < 6) {
      const link = LINK.exec(text.slice(i));
      const href = link && safeUrl(link[2]);
      if (href) {
        flush();
        const a = externalLink(href);
        appendInline(a, link[1], nesting + 1);
        parent.append(a);
        i += link[0].length;
        continue;
      }
    }
    if (ch === "h" && !isWordChar(text[i - 1])) {
      const auto = AUTOLINK.exec(text.slice(i));
      const href = auto && safeUrl(auto[0]);
      if (href) {
        flush();
        const a = externalLink(href);
        a.textContent = auto[0];
        parent.append(a);
        i += auto[0].length;
        continue;
      }
    }
    plain += ch;
    i += 1;
  }
  flush();
}
