// A test-only page on the public `vocode` React SDK (1.0.37) in self-hosted mode, pointed at
// gazelle's /conversation through the `backend` query parameter. It exposes the hook's state as
// `window.sdk` for tests/browser.mjs; `spoke` turns true once the SDK played bot audio.
import React from "react";
import { createRoot } from "react-dom/client";
import { useConversation } from "vocode";

const backendUrl = new URLSearchParams(location.search).get("backend");

function App() {
  const c = useConversation({ backendUrl, audioDeviceConfig: {}, subscribeTranscript: true });
  const spoke = React.useRef(false);
  if (c.currentSpeaker === "agent") spoke.current = true;
  window.sdk = {
    status: c.status,
    currentSpeaker: c.currentSpeaker,
    spoke: spoke.current,
    error: c.error ? String(c.error) : null,
    transcripts: c.transcripts,
  };
  return React.createElement(
    "div",
    null,
    React.createElement("button", { id: "go", onClick: c.start }, "start"),
    React.createElement("p", null, `status: ${c.status}, speaker: ${c.currentSpeaker}`),
  );
}

createRoot(document.getElementById("root")).render(React.createElement(App));
