using System;
using System.Threading.Tasks;

namespace Npcd
{
    /// <summary>One requested line. Its events fire inside NpcdClient.Poll, on the thread
    /// that polls: Started, TextDelta*, then Finished or Failed. A structured line also
    /// raises EmotionChanged and ActionChosen (each at most once, after some text, before
    /// Finished); a line with a Segmentation raises SentenceReady for each complete sentence,
    /// right after the TextDelta that completed it (the last one right before Finished), the
    /// sentences adding up to the result's Text. Completion completes at the same time as Finished or Failed, never faults,
    /// and carries the same result.</summary>
    public sealed class NpcdLine
    {
        private readonly NpcdClient client;
        private readonly TaskCompletionSource<LineResult> completion = new TaskCompletionSource<LineResult>();

        public readonly string Id;
        public readonly string Persona;
        /// <summary>The text so far: the deltas received, concatenated.</summary>
        public string Text { get; private set; }
        public bool IsStarted { get; private set; }
        /// <summary>The action the NPC takes (structured lines); null until ActionChosen.</summary>
        public NpcdAction Action { get; private set; }
        /// <summary>The emotion of the line (structured lines); null until EmotionChanged.</summary>
        public string Emotion { get; private set; }
        public bool IsDone { get { return Result != null; } }
        public LineResult Result { get; private set; }
        public Task<LineResult> Completion { get { return completion.Task; } }

        public event Action<NpcdLine> Started;
        public event Action<NpcdLine, string> TextDelta;
        public event Action<NpcdLine, NpcdAction> ActionChosen;
        public event Action<NpcdLine, string> EmotionChanged;
        public event Action<NpcdLine, NpcdSentence> SentenceReady;
        public event Action<NpcdLine, LineResult> Finished;
        public event Action<NpcdLine, NpcdError> Failed;
        /// <summary>The daemon refused another request with this line's id (its message); this
        /// line goes on. Rare: the client itself refuses ids in use.</summary>
        public event Action<NpcdLine, string> DuplicateRefused;

        internal NpcdLine(NpcdClient client, string id, string persona)
        {
            this.client = client;
            Id = id;
            Persona = persona;
            Text = string.Empty;
        }

        /// <summary>Ends the line early; it then finishes with FinishReason.Cancelled.
        /// False when it already ended.</summary>
        public bool Cancel()
        {
            return !IsDone && client.Cancel(Id);
        }

        internal void OnStarted()
        {
            IsStarted = true;
            var handler = Started;
            if (handler != null) handler(this);
        }

        internal void OnTextDelta(string text)
        {
            Text += text;
            var handler = TextDelta;
            if (handler != null) handler(this, text);
        }

        internal void OnAction(NpcdAction action)
        {
            Action = action;
            var handler = ActionChosen;
            if (handler != null) handler(this, action);
        }

        internal void OnEmotion(string label)
        {
            Emotion = label;
            var handler = EmotionChanged;
            if (handler != null) handler(this, label);
        }

        internal void OnSentence(NpcdSentence sentence)
        {
            var handler = SentenceReady;
            if (handler != null) handler(this, sentence);
        }

        internal void OnDuplicate(string message)
        {
            var handler = DuplicateRefused;
            if (handler != null) handler(this, message);
        }

        internal void OnEnded(LineResult result)
        {
            Result = result;
            try
            {
                if (result.Failed)
                {
                    var failed = Failed;
                    if (failed != null) failed(this, result.Error);
                }
                else
                {
                    var finished = Finished;
                    if (finished != null) finished(this, result);
                }
            }
            finally
            {
                completion.TrySetResult(result);
            }
        }
    }
}
