using System.Collections.Generic;
using Godot;
using Npcd;

namespace NpcdGodot
{
    /// <summary>An NPC's voice. Call Say from GDScript or C#; the text arrives through the
    /// signals text_delta, line_finished and line_failed (with a retry hint when the daemon is busy), on the main thread. One line at a
    /// time: a new Say, or leaving the tree, cancels the line still streaming. Structured
    /// lines (Structured, SetActions or ResponseFormat) also emit emotion_changed and
    /// action_chosen, after some text and before line_json and line_finished. With a
    /// Segmentation, sentence_ready brings each complete sentence (or clause) for
    /// text-to-speech, right after the text that completed it.</summary>
    [GlobalClass]
    public partial class NpcDialogue : Node
    {
#pragma warning disable IDE1006 // the signal names are snake_case, as GDScript expects
        /// <summary>New text of the line; full_text is everything so far.</summary>
        [Signal] public delegate void text_deltaEventHandler(string requestId, string text, string fullText);
        /// <summary>reason: 1 stop, 2 length, 3 cancelled, 4 deadline.</summary>
        [Signal] public delegate void line_finishedEventHandler(string requestId, string text, int reason);
        /// <summary>code: a gRPC status code (14: the daemon is unreachable; 8: its queue is full, and
        /// retry_after_ms says when to ask again; 0 otherwise).</summary>
        [Signal] public delegate void line_failedEventHandler(string requestId, int code, string message, int retryAfterMs);
        /// <summary>Structured lines: the action the NPC takes; args_json is a JSON object
        /// ("{}" when it takes none), e.g. for JSON.parse_string.</summary>
        [Signal] public delegate void action_chosenEventHandler(string requestId, string name, string argsJson);
        /// <summary>Structured lines: the emotion of the line, one of the persona's.</summary>
        [Signal] public delegate void emotion_changedEventHandler(string requestId, string label);
        /// <summary>Structured lines: the whole reply as JSON, right before line_finished.</summary>
        [Signal] public delegate void line_jsonEventHandler(string requestId, string json);
        /// <summary>Lines with a Segmentation: a complete sentence (or clause), index 0, 1, 2 ...;
        /// the texts, in order, add up to the line's text exactly.</summary>
        [Signal] public delegate void sentence_readyEventHandler(string requestId, int index, string text);
#pragma warning restore IDE1006

        [Export] public string Persona { get; set; } = "";
        [Export] public string NpcId { get; set; } = "";
        /// <summary>0 takes the persona's default.</summary>
        [Export] public int MaxTokens { get; set; }
        [Export] public bool PlayerPriority { get; set; } = true;
        /// <summary>Lines come with one of the persona's emotions and actions.</summary>
        [Export] public bool Structured { get; set; }
        /// <summary>A JSON Schema (JSON text) the reply follows instead; its fields arrive in
        /// line_json. Empty: none.</summary>
        [Export(PropertyHint.MultilineText)] public string ResponseFormat { get; set; } = "";
        /// <summary>Sentence or Clause: sentence_ready for each complete sentence (or clause).</summary>
        [Export] public Segmentation Segmentation { get; set; } = Segmentation.None;
        /// <summary>The conversation the lines belong to (e.g. the NPC id): the daemon remembers
        /// the turns. Empty: none.</summary>
        [Export] public string Conversation { get; set; } = "";

        private NpcdLine current;
        private readonly List<ActionSpec> actions = new List<ActionSpec>();

        /// <summary>The actions valid for the next lines, instead of all of the persona's (an
        /// empty array: the persona's again). Each entry is a persona action's name, or a
        /// Dictionary {"name", "description", "args"} declaring a new one, "args" being the
        /// JSON Schema of its arguments object (a Dictionary or JSON text). A non-empty list
        /// makes the lines structured.</summary>
        public void SetActions(Godot.Collections.Array list)
        {
            actions.Clear();
            foreach (Variant entry in list)
            {
                if (entry.VariantType == Variant.Type.String || entry.VariantType == Variant.Type.StringName)
                {
                    actions.Add(new ActionSpec(entry.AsString()));
                    continue;
                }
                var spec = entry.AsGodotDictionary();
                string description = spec.ContainsKey("description") ? spec["description"].AsString() : null;
                string args = null;
                if (spec.ContainsKey("args"))
                {
                    Variant schema = spec["args"];
                    args = schema.VariantType == Variant.Type.String ? schema.AsString() : Json.Stringify(schema);
                }
                actions.Add(new ActionSpec(spec.ContainsKey("name") ? spec["name"].AsString() : "", description, args));
            }
        }

        /// <summary>Asks for a line; returns its request id.</summary>
        public string Say(string speaker, string line, Godot.Collections.Dictionary<string, string> context = null)
        {
            Cancel();
            var request = new LineRequest(Persona, line)
            {
                Speaker = speaker,
                NpcId = NpcId,
                Priority = PlayerPriority ? Priority.Player : Priority.Ambient,
                Structured = Structured,
                Segmentation = Segmentation,
            };
            if (!string.IsNullOrEmpty(Conversation)) request.Conversation = Conversation;
            if (MaxTokens > 0) request.MaxTokens = (uint)MaxTokens;
            if (!string.IsNullOrEmpty(ResponseFormat)) request.ResponseFormat = ResponseFormat;
            request.Actions.AddRange(actions);
            if (context != null)
            {
                foreach (var entry in context) request.Context[entry.Key] = entry.Value;
            }
            var service = GetNode<NpcdService>("/root/Npcd");
            current = service.Client.Say(request);
            Attach(current);
            return current.Id;
        }

        // The lines whose events this node still receives: the current one, and lines a new Say
        // cancelled, whose cancelled Finished is still to come. Leaving the tree detaches them
        // all, so that no event reaches a freed node (EmitSignal on it would throw
        // ObjectDisposedException out of the autoload's _Process).
        private readonly HashSet<NpcdLine> attached = new HashSet<NpcdLine>();

        private void Attach(NpcdLine line)
        {
            attached.Add(line);
            line.TextDelta += OnTextDelta;
            line.EmotionChanged += OnEmotionChanged;
            line.ActionChosen += OnActionChosen;
            line.SentenceReady += OnSentenceReady;
            line.Finished += OnFinished;
            line.Failed += OnFailed;
        }

        private void Detach(NpcdLine line)
        {
            attached.Remove(line);
            line.TextDelta -= OnTextDelta;
            line.EmotionChanged -= OnEmotionChanged;
            line.ActionChosen -= OnActionChosen;
            line.SentenceReady -= OnSentenceReady;
            line.Finished -= OnFinished;
            line.Failed -= OnFailed;
        }

        private void OnTextDelta(NpcdLine l, string text) => EmitSignal(SignalName.text_delta, l.Id, text, l.Text);
        private void OnEmotionChanged(NpcdLine l, string label) => EmitSignal(SignalName.emotion_changed, l.Id, label);
        private void OnActionChosen(NpcdLine l, NpcdAction action) =>
            EmitSignal(SignalName.action_chosen, l.Id, action.Name, action.ArgsJson);
        private void OnSentenceReady(NpcdLine l, NpcdSentence sentence) =>
            EmitSignal(SignalName.sentence_ready, l.Id, sentence.Index, sentence.Text);

        private void OnFinished(NpcdLine l, LineResult result)
        {
            Detach(l);
            if (result.Json.Length > 0) EmitSignal(SignalName.line_json, l.Id, result.Json);
            EmitSignal(SignalName.line_finished, l.Id, result.Text, (int)result.Reason);
        }

        private void OnFailed(NpcdLine l, NpcdError error)
        {
            Detach(l);
            EmitSignal(SignalName.line_failed, l.Id, error.Code, error.Message, (int)error.RetryAfterMs);
        }

        /// <summary>Cancels the line still streaming, if any.</summary>
        public void Cancel()
        {
            if (current != null && !current.IsDone) current.Cancel();
            current = null;
        }

        public override void _ExitTree()
        {
            Cancel();
            foreach (NpcdLine line in new List<NpcdLine>(attached)) Detach(line);
        }
    }
}
