// Drives the AI SDK's own chat (the state `useChat` wraps, without React) against the service and
// prints what the SDK ended up with, as one JSON object, for tests/test_aisdk.py to check.
//
//   node drive.mjs <package: ai | ai-7> <base url> <chat id prefix>

const [pkg, base, prefix] = process.argv.slice(2);
const { AbstractChat, DefaultChatTransport, TextStreamChatTransport } = await import(pkg);

// What `useChat` keeps in React state, kept in plain fields.
class State {
  status = "ready";
  error = undefined;
  messages = [];
  pushMessage = (message) => {
    this.messages = this.messages.concat(message);
  };
  popMessage = () => {
    this.messages = this.messages.slice(0, -1);
  };
  replaceMessage = (index, message) => {
    this.messages = [...this.messages.slice(0, index), message, ...this.messages.slice(index + 1)];
  };
  snapshot = (thing) => structuredClone(thing);
}

class Chat extends AbstractChat {
  constructor(init) {
    super({ ...init, state: new State() });
  }
}

function seen(chat) {
  return {
    status: chat.status,
    error: chat.error === undefined ? null : String(chat.error.message),
    messages: chat.messages.map((message) => ({
      id: message.id,
      role: message.role,
      text: message.parts
        .filter((part) => part.type === "text")
        .map((part) => part.text)
        .join(""),
    })),
  };
}

const sse = (id) => new Chat({ id, transport: new DefaultChatTransport({ api: `${base}/chat` }) });
const text = (id) =>
  new Chat({
    id,
    transport: new TextStreamChatTransport({
      prepareSendMessagesRequest: ({ id }) => ({ api: `${base}/chat/${id}/stream` }),
    }),
  });

async function waitFor(check, what) {
  const deadline = Date.now() + 10_000;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

const results = {};

// The scenarios below use chats of their own, so they run side by side: each waits mostly on replies
// streamed slowly on purpose.
const scenarios = [];

// Two turns and a regenerate, with nothing but the endpoint configured.
scenarios.push(async () => {
  const chat = sse(`${prefix}-sse`);
  await chat.sendMessage({ text: "hello" });
  const first = seen(chat);
  await chat.sendMessage({ text: "again" });
  const second = seen(chat);
  await chat.regenerate();
  results.sse = { first, second, regenerated: seen(chat) };
});

// The text transport on the session's own route.
scenarios.push(async () => {
  const chat = text(`${prefix}-text`);
  await chat.sendMessage({ text: "hello" });
  await chat.sendMessage({ text: "again" });
  const second = seen(chat);
  await chat.regenerate();
  results.text = { second, regenerated: seen(chat) };
});

// A turn while another of the same session is in flight: the 409 surfaces as the chat's error.
for (const [name, make] of [
  ["sse", sse],
  ["text", text],
]) {
  scenarios.push(async () => {
    const id = `${prefix}-busy-${name}`;
    const slow = make(id);
    const running = slow.sendMessage({ text: "@@deltas=60 @@delay=0.05" });
    await waitFor(() => slow.status === "streaming", "the slow reply to stream");
    const busy = make(id);
    await busy.sendMessage({ text: "meanwhile" });
    await running;
    results[`busy_${name}`] = { busy: seen(busy), slow: seen(slow) };
  });
}

// A reply cut midway by the model: an error, never a whole-looking reply.
for (const [name, make] of [
  ["sse", sse],
  ["text", text],
]) {
  scenarios.push(async () => {
    const chat = make(`${prefix}-cut-${name}`);
    await chat.sendMessage({ text: "@@deltas=6 @@delay=0.05 @@drop_after=3" });
    results[`cut_${name}`] = seen(chat);
  });
}

// A page reloaded mid-reply: a new chat with the same id (as `useChat({ resume: true })` makes on load)
// resumes the reply in flight and ends with all of it; once nothing is in flight, resuming finds nothing.
scenarios.push(async () => {
  const id = `${prefix}-resume`;
  const first = sse(id);
  const running = first.sendMessage({ text: "@@deltas=40 @@delay=0.05" });
  await waitFor(() => first.status === "streaming", "the reply to stream");
  const reloaded = sse(id);
  await reloaded.resumeStream();
  await running;
  const later = sse(id);
  await later.resumeStream();
  results.resume = { first: seen(first), reloaded: seen(reloaded), later: seen(later) };
});

await Promise.all(scenarios.map((scenario) => scenario()));

process.stdout.write(JSON.stringify(results));
