using Godot;
using Npcd;

namespace NpcdGodot
{
    /// <summary>An NPC's voice. Call Say from GDScript or C#; the text arrives through the
    /// signals text_delta, line_finished and line_failed, on the main thread. One line at a
    /// time: a new Say, or leaving the tree, cancels the line still streaming.</summary>
    [GlobalClass]
    public partial class NpcDialogue : Node
    {
#pragma warning disable IDE1006 // the signal names are snake_case, as GDScript expects
        /// <summary>New text of the line; full_text is everything so far.</summary>
        [Signal] public delegate void text_deltaEventHandler(string requestId, string text, string fullText);
        /// <summary>reason: 1 stop, 2 length, 3 cancelled, 4 deadline.</summary>
        [Signal] public delegate void line_finishedEventHandler(string requestId, string text, int reason);
        /// <summary>code: a gRPC status code (14: the daemon is unreachable).</summary>
        [Signal] public delegate void line_failedEventHandler(string requestId, int code, string message);
#pragma warning restore IDE1006

        [Export] public string Persona { get; set; } = "";
        [Export] public string NpcId { get; set; } = "";
        /// <summary>0 takes the persona's default.</summary>
        [Export] public int MaxTokens { get; set; }
        [Export] public bool PlayerPriority { get; set; } = true;

        private NpcdLine current;

        /// <summary>Asks for a line; returns its request id.</summary>
        public string Say(string speaker, string line, Godot.Collections.Dictionary<string, string> context = null)
        {
            Cancel();
            var request = new LineRequest(Persona, line)
            {
                Speaker = speaker,
                NpcId = NpcId,
                Priority = PlayerPriority ? Priority.Player : Priority.Ambient,
            };
            if (MaxTokens > 0) request.MaxTokens = (uint)MaxTokens;
            if (context != null)
            {
                foreach (var entry in context) request.Context[entry.Key] = entry.Value;
            }
            var service = GetNode<NpcdService>("/root/Npcd");
            current = service.Client.Say(request);
            current.TextDelta += (l, text) => EmitSignal(SignalName.text_delta, l.Id, text, l.Text);
            current.Finished += (l, result) => EmitSignal(SignalName.line_finished, l.Id, result.Text, (int)result.Reason);
            current.Failed += (l, error) => EmitSignal(SignalName.line_failed, l.Id, error.Code, error.Message);
            return current.Id;
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
        }
    }
}
